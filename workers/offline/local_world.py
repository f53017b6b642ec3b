"""Run offline generations on an expert-parallel world of local processes and collect the results.

`LocalWorld` validates the placement before anything starts (a `PlacementError` costs no process),
starts the ranks (`offline.rank.run_rank`) through the shared launcher, and collects what they
report. If a rank fails, the others fail too within the collective timeout (their collectives error
out); whatever is still running `timeout + grace` seconds after the first failure is killed.
`RankFailure` then names the rank that failed first (one that died, hung or raised on its own,
rather than one that only lost a peer).
"""

from __future__ import annotations

import os
import pickle
import queue
import time
from pathlib import Path
from typing import Any

from moeserve.workers.model.config import ModelConfig
from moeserve.workers.offline.rank import RankResult, Run, run_rank
from moeserve.workers.parallel.launch import (
    RankError,
    RankProcesses,
    describe_error,
    exit_reason,
    root_cause,
)
from moeserve.workers.parallel.settings import EPSettings
from moeserve.workers.parallel.world import Rendezvous, WorldLayout

GRACE_S = 5.0  # after the first failure, on top of the collective timeout, before killing the rest


class RankFailure(RuntimeError):
    """One or more ranks failed; `first` is the root cause, `errors` every rank's message."""

    def __init__(self, layout: WorldLayout, first: int, errors: dict[int, RankError]):
        self.layout = layout
        self.first = first
        self.errors = errors
        others = "; ".join(f"{errors[r].message}" for r in sorted(errors) if r != first)
        super().__init__(
            f"{layout.describe(first)} failed: {errors[first].message}"
            + (f"\nthen the other ranks stopped: {others}" if others else "")
        )


def _child(
    rank: int, rendezvous: Rendezvous, model_path: Path, settings: EPSettings, runs: list[Run], messages: Any
) -> None:
    """Process entry: run the rank; report the outcome; exit non-zero on failure."""

    def report(kind: str, r: int, payload: Any) -> None:
        # plain pickle: torch's queue reductions would share tensors through this process's fds,
        # which vanish when it exits
        messages.put((kind, r, pickle.dumps(payload)))

    try:
        result = run_rank(rank, model_path, settings, runs, rendezvous, report)
    except BaseException as e:  # noqa: BLE001 - every failure is reported, then the process ends
        report("error", rank, describe_error(settings.layout.describe(rank), e))
        messages.close()
        messages.join_thread()
        os._exit(1)
    report("done", rank, result)


class LocalWorld:
    """A + E local rank processes for one model instance. `start`, then `join`."""

    def __init__(self, model_path: str | Path, settings: EPSettings, runs: list[Run]):
        self.model_path = Path(model_path)
        self.settings = settings
        self.layout = settings.layout
        self.runs = runs
        settings.expert_placement(ModelConfig.from_file(self.model_path))  # PlacementError before start
        for run in runs:
            if len(run.prompts) != self.layout.attention_ranks:
                raise ValueError(
                    f"a run lists prompts for {len(run.prompts)} attention ranks, "
                    f"not {self.layout.attention_ranks}"
                )
        self.ready: set[int] = set()
        self.results: dict[int, RankResult] = {}
        self.errors: dict[int, RankError] = {}
        self.exited_at: dict[int, float] = {}

    def start(self) -> None:
        self.ranks = RankProcesses(
            self.layout, "moeserve.workers.offline.rank", self.settings.startup_timeout_s
        )
        self.messages = self.ranks.ctx.Queue()
        args = (self.model_path, self.settings, self.runs, self.messages)
        self.ranks.start(_child, lambda rank: args, daemon=False)

    def pid(self, rank: int) -> int:
        return self.ranks.pid(rank)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every rank has loaded its weights (raises `RankFailure` if one fails first)."""
        deadline = time.monotonic() + timeout_s
        while len(self.ready) < self.layout.size:
            self._poll(0.2)
            if self.errors or self.ranks.any_failed():
                self.join()
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(set(range(self.layout.size)) - self.ready)} not ready")

    def join(self) -> list[RankResult]:
        """Wait for every rank; results by rank, or `RankFailure` naming the rank that failed first."""
        failed_at: float | None = None
        limit = self.settings.collective_timeout_s + GRACE_S
        while self.ranks.any_alive():
            self._poll(0.2)
            for rank in range(self.layout.size):
                if self.ranks.exitcode(rank) is not None:
                    self.exited_at.setdefault(rank, time.time())
            if failed_at is None and (self.errors or self.ranks.any_failed()):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > limit:
                self._kill_remaining(limit)
        self.ranks.join(float("inf"))
        self._poll(0.0)
        for rank in range(self.layout.size):
            code = self.ranks.exitcode(rank)
            if code != 0 and rank not in self.errors:
                at = self.exited_at.get(rank, time.time())
                self.errors[rank] = RankError(exit_reason(code), False, at)
            elif rank not in self.results and rank not in self.errors:
                self.errors[rank] = RankError("exited without a result", False, time.time())
        if self.errors:
            raise RankFailure(self.layout, root_cause(self.errors), dict(self.errors))
        return [self.results[r] for r in range(self.layout.size)]

    def _poll(self, timeout_s: float) -> None:
        while True:
            try:
                kind, rank, data = self.messages.get(timeout=timeout_s)
            except queue.Empty:
                return
            payload = pickle.loads(data)
            timeout_s = 0.0
            if kind == "ready":
                self.ready.add(rank)
            elif kind == "done":
                self.results[rank] = payload
            else:
                self.errors.setdefault(rank, payload)

    def _kill_remaining(self, limit_s: float) -> None:
        for rank in range(self.layout.size):
            if self.ranks.exitcode(rank) is None:
                message = f"no answer {limit_s:g} s after the first failure; killed by the launcher"
                self.errors.setdefault(rank, RankError(message, False, time.time()))
                self.ranks.kill(rank)


def launch_local(model_path: str | Path, settings: EPSettings, runs: list[Run]) -> list[RankResult]:
    """Run `runs` on a fresh local world and return every rank's result (raises `RankFailure`)."""
    world = LocalWorld(model_path, settings, runs)
    world.start()
    return world.join()
