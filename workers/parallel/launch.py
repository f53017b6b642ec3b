"""Start an expert-parallel model instance as A + E local processes and supervise them.

The launcher validates the placement before anything starts (a `PlacementError` costs no process),
hosts the rendezvous `TCPStore` on 127.0.0.1 only (port chosen by the OS, so there is no free-port
race; every rank proves it holds a fresh secret that only the ranks get), forks one process per rank from a
forkserver that has already imported torch, and collects what the ranks report. If a rank fails, the
others fail too within the collective timeout (their collectives error out); whatever is still
running `timeout + grace` seconds after the first failure is killed. `RankFailure` then names the
rank that failed first (one that died, hung or raised on its own, rather than one that only lost a
peer). Ray-placed instances use `ep_rank.run_rank` directly and do not go through this module.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import time
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from moeserve.workers.config import ModelConfig
from moeserve.workers.ep_rank import EPSettings, RankError, RankResult, Run, describe_error, run_rank
from moeserve.workers.ep_world import WorldLayout, host_store, new_secret

STORE_HOST = "127.0.0.1"
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
    rank: int,
    model_path: Path,
    settings: EPSettings,
    runs: list[Run],
    store_port: int,
    secret: bytes,
    messages: Any,
) -> None:
    """Process entry: run the rank; report the outcome; exit non-zero on failure."""

    def report(kind: str, r: int, payload: Any) -> None:
        # plain pickle: torch's queue reductions would share tensors through this process's fds,
        # which vanish when it exits
        messages.put((kind, r, pickle.dumps(payload)))

    try:
        result = run_rank(rank, model_path, settings, runs, STORE_HOST, store_port, secret, report)
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
        self.procs: list[Any] = []
        self.ready: set[int] = set()
        self.results: dict[int, RankResult] = {}
        self.errors: dict[int, RankError] = {}
        self.exited_at: dict[int, float] = {}

    def start(self) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "moeserve.workers.ep_rank"])
        self.store = host_store(STORE_HOST, self.settings.startup_timeout_s)
        secret = new_secret()
        self.messages = ctx.Queue()
        for rank in range(self.layout.size):
            proc = ctx.Process(
                target=_child,
                args=(
                    rank,
                    self.model_path,
                    self.settings,
                    self.runs,
                    self.store.port,
                    secret,
                    self.messages,
                ),
                name=f"moeserve-{self.layout.role(rank)}-{rank}",
            )
            proc.start()
            self.procs.append(proc)

    def pid(self, rank: int) -> int:
        return int(self.procs[rank].pid)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every rank has loaded its weights (raises `RankFailure` if one fails first)."""
        deadline = time.monotonic() + timeout_s
        while len(self.ready) < self.layout.size:
            self._poll(0.2)
            if self.errors or any(p.exitcode not in (None, 0) for p in self.procs):
                self.join()
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(set(range(self.layout.size)) - self.ready)} not ready")

    def join(self) -> list[RankResult]:
        """Wait for every rank; results by rank, or `RankFailure` naming the rank that failed first."""
        failed_at: float | None = None
        limit = self.settings.collective_timeout_s + GRACE_S
        while any(p.is_alive() for p in self.procs):
            self._poll(0.2)
            for rank, proc in enumerate(self.procs):
                if proc.exitcode is not None:
                    self.exited_at.setdefault(rank, time.time())
            if failed_at is None and (self.errors or any(p.exitcode not in (None, 0) for p in self.procs)):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > limit:
                self._kill_remaining()
        for proc in self.procs:
            proc.join()
        self._poll(0.0)
        for rank, proc in enumerate(self.procs):
            if proc.exitcode != 0 and rank not in self.errors:
                at = self.exited_at.get(rank, time.time())
                self.errors[rank] = RankError(_exit_reason(proc.exitcode), False, at)
            elif rank not in self.results and rank not in self.errors:
                self.errors[rank] = RankError("exited without a result", False, time.time())
        if self.errors:
            raise RankFailure(self.layout, _root_cause(self.errors), dict(self.errors))
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

    def _kill_remaining(self) -> None:
        for rank, proc in enumerate(self.procs):
            if proc.is_alive():
                self.errors.setdefault(
                    rank,
                    RankError(
                        f"no answer {self.settings.collective_timeout_s + GRACE_S:g} s after the first "
                        "failure; killed by the launcher",
                        False,
                        time.time(),
                    ),
                )
                proc.kill()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"died with signal {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _root_cause(errors: dict[int, RankError]) -> int:
    """The earliest failure that is not just the consequence of a collective failing."""
    own = {r: e for r, e in errors.items() if not e.collective}
    pool = own or errors
    return min(pool, key=lambda r: (pool[r].at, r))


def launch_local(model_path: str | Path, settings: EPSettings, runs: list[Run]) -> list[RankResult]:
    """Run `runs` on a fresh local world and return every rank's result (raises `RankFailure`)."""
    world = LocalWorld(model_path, settings, runs)
    world.start()
    return world.join()
