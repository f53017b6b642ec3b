"""The serving loops of an expert-parallel model instance: every rank steps in lockstep.

`LockstepLoop` is `EngineLoop` for an attention rank: the same inbox, aborts, deadlines and
failure handling, but each iteration starts with `EPWorld.control`, which every rank of
the world joins. When no attention rank has work, every rank idles a few milliseconds and loops;
when any has work, every attention rank steps (one with nothing scheduled runs the model over an
empty batch, which still joins every MoE collective) and the expert ranks serve each MoE layer
once (`serve_experts`: `ExpertServer.serve` in serving mode); when any rank asks to stop, all
leave in the same iteration.
This module knows nothing about processes, Ray or gRPC; the world and the runner are passed in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from moeserve.workers.engine.core import Engine
from moeserve.workers.engine.loop import EngineLoop
from moeserve.workers.parallel.dispatch import ExpertServer
from moeserve.workers.parallel.world import EPWorld, StepControl

log = logging.getLogger(__name__)
IDLE_S = 0.005  # how long every rank sleeps when no attention rank has work


class LockstepLoop(EngineLoop):
    """An attention rank's engine loop; `engine.runner` must route its MoE layers through `world`."""

    def __init__(
        self,
        engine: Engine,
        world: EPWorld,
        on_failure: Callable[[BaseException], None] | None = None,
        idle_s: float = IDLE_S,
        after_step: Callable[[], None] | None = None,
    ):
        """`after_step` runs once each step's model work is done, before the next step's control
        (the routed executor's `LockstepPasses.finish_step`)."""
        super().__init__(engine, on_failure)
        self.world = world
        self.idle_s = idle_s
        self.after_step = after_step
        self.steps = 0  # steps this rank took part in, empty ones included

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                inbox, aborts, stopping = self._drain_inbox()
                for request in inbox:
                    engine.add(request)
                for key, cause in aborts:
                    engine.abort(key, cause)
                engine.expire(time.monotonic())
                agreed = self.world.control(StepControl(engine.has_work, 1, stopping))
                go, stop = agreed.work, agreed.stop
                if stop:
                    engine.abort_all("stopping")
                    self.mark_stopping()
                    return
                if not go:
                    self.idle(self.idle_s)
                    continue
                plan = engine.scheduler.schedule() if engine.has_work else None
                self.count_waiting()
                self.steps += 1
                if plan is not None and plan.chunks:
                    engine.execute(plan)
                else:  # nothing of ours to run: join the step's collectives with an empty batch
                    engine.runner.step([])
                if self.after_step is not None:
                    self.after_step()
        except BaseException as e:  # noqa: BLE001 - every failure must reach the requests and the health check
            log.exception("%s: lockstep step failed", self.world.name)
            self._fail(e)


def serve_experts(server: ExpertServer, stop: threading.Event | None = None, idle_s: float = IDLE_S) -> int:
    """An expert rank's serving loop, the counterpart of `LockstepLoop`; returns the steps served.

    Setting `stop` makes this rank ask the world to stop at the next iteration."""
    return server.serve(stop=stop if stop is not None else threading.Event(), idle_s=idle_s)
