"""One launcher for every local expert-parallel world: A + E rank processes on this machine.

`RankProcesses` hosts the rendezvous `TCPStore` on 127.0.0.1 only (port chosen by the OS, so there is
no free-port race), draws the per-instance secret every rank must prove it holds, and forks one
process per rank from a forkserver that has already imported torch and the rank program. It also
knows how processes end (`exit_reason`) and which failure came first (`root_cause`). What a rank
runs, and the messages it sends back, belong to its caller: the offline world
(`offline.local_world`) and the server's local ranks (`server.local_ranks`). Ray-placed instances
start their ranks as actors (`ray_app.ranks`) and do not use this module.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from moeserve.workers.parallel.world import CollectiveError, Rendezvous, WorldLayout, host_store, new_secret

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RankError:
    """One rank's failure as its supervisor records it."""

    message: str
    collective: bool
    """True: a consequence of a peer's failure (or a timeout), not a root cause."""
    at: float
    """time.time() of the failure."""


def describe_error(world_name: str, error: BaseException) -> RankError:
    if isinstance(error, CollectiveError):
        return RankError(str(error), True, time.time())
    return RankError(f"{world_name}: {type(error).__name__}: {error}", False, time.time())


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"died with signal {signal.Signals(-code).name}"
    return f"exited with code {code}"


def root_cause(errors: dict[int, RankError]) -> int:
    """The earliest failure that is not just the consequence of a collective failing."""
    own = {r: e for r, e in errors.items() if not e.collective}
    pool = own or errors
    return min(pool, key=lambda r: (pool[r].at, r))


class RankProcesses:
    """The processes of one local world. Make queues with `ctx`, then `start`; `kill_all` ends them."""

    def __init__(self, layout: WorldLayout, program: str, startup_timeout_s: float):
        """`program`: the module the ranks run, imported once by the forkserver (with torch)."""
        self.layout = layout
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "torch.distributed", program])
        self._store: dist.TCPStore | None = host_store(LOOPBACK, startup_timeout_s)
        self.rendezvous = Rendezvous(LOOPBACK, self._store.port, new_secret())
        self.procs: list[Any] = []

    def start(
        self, target: Callable[..., None], args_of: Callable[[int], tuple[Any, ...]], daemon: bool
    ) -> None:
        """Start `target(rank, rendezvous, *args_of(rank))` for every rank."""
        for rank in range(self.layout.size):
            proc = self.ctx.Process(
                target=target,
                args=(rank, self.rendezvous, *args_of(rank)),
                name=f"moeserve-{self.layout.role(rank)}-{rank}",
                daemon=daemon,
            )
            proc.start()
            self.procs.append(proc)

    def close_store(self) -> None:
        """Every rank has joined: nothing needs to listen for the rendezvous any more."""
        self._store = None

    def pid(self, rank: int) -> int:
        return int(self.procs[rank].pid)

    def exitcode(self, rank: int) -> int | None:
        code = self.procs[rank].exitcode
        return None if code is None else int(code)

    def any_alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def any_failed(self) -> bool:
        return any(p.exitcode not in (None, 0) for p in self.procs)

    def first_exited(self, besides: int) -> int | None:
        """A rank other than `besides` that has exited, if any."""
        return next((r for r, p in enumerate(self.procs) if r != besides and p.exitcode is not None), None)

    def describe_exit(self, rank: int) -> str:
        return f"{self.layout.describe(rank)} {exit_reason(self.exitcode(rank))}"

    def lead_with_dead_peer(self, rank: int, message: str, grace_s: float = 0.3) -> str:
        """`rank`'s error, led by the death of another rank if one died (within `grace_s`): a dead
        peer is the likelier cause of a failed collective."""
        end = time.monotonic() + grace_s
        while True:
            dead = self.first_exited(besides=rank)
            if dead is not None:
                return f"{self.describe_exit(dead)}; then {message}"
            if time.monotonic() > end:
                return message
            time.sleep(0.02)

    def join(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(max(0.0, end - time.monotonic()))

    def kill(self, rank: int) -> None:
        if self.procs[rank].is_alive():
            self.procs[rank].kill()

    def kill_all(self, join_s: float = 5.0) -> None:
        for rank in range(len(self.procs)):
            self.kill(rank)
        for proc in self.procs:
            proc.join(join_s)
