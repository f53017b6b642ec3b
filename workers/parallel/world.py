"""One expert-parallel model instance as a `torch.distributed` world: roles, collectives, timeouts.

Global ranks 0..A-1 are attention ranks, A..A+E-1 expert ranks. `EPWorld` is the explicit object
the dispatch code and the rank loops receive: its process group, this rank's role, the device
tensors live on (CPU for gloo, one GPU per rank for NCCL) and the collective timeout. Every
collective goes through it, so a dead or hung peer becomes a `CollectiveError` naming this rank and
the operation, raised by the backend's own timeout or, as a backstop, by a `Watchdog` that ends the
process. This module knows nothing about models or experts.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.distributed as dist

Backend = Literal["gloo", "nccl"]
Role = Literal["attention", "expert"]


@dataclass(frozen=True)
class StepControl:
    """What a rank says at the start of a step (`EPWorld.control`)."""

    work: bool = False
    """This rank has something to compute this step."""
    micro_batches: int = 0
    """Micro-batches this rank wants the step split into (expert ranks ask for none)."""
    stop: bool = False
    """This rank leaves the lockstep (serving shuts down)."""
    between: bool = False
    """This rank asks every rank to run its `BetweenSteps` action before this step (a rebalance)."""


class BetweenSteps(Protocol):
    """Work every rank does in lockstep between two steps when any rank asks (`EPWorld.control`)."""

    def wanted(self) -> bool:
        """Whether this rank asks for the action at the start of this step."""
        ...

    def observe(self, agreed: StepControl) -> None:
        """What the ranks agreed for the step about to run (called every step, before `run`)."""
        ...

    def run(self) -> None:
        """The action; it may run collectives, which every rank joins in the same order."""
        ...


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer died, hung or left the lockstep."""


@dataclass(frozen=True)
class WorldLayout:
    """A attention ranks then E expert ranks."""

    attention_ranks: int
    expert_ranks: int

    def __post_init__(self) -> None:
        if self.attention_ranks < 1 or self.expert_ranks < 1:
            raise ValueError(
                f"an expert-parallel world needs >= 1 attention and >= 1 expert rank, got "
                f"{self.attention_ranks} and {self.expert_ranks}"
            )

    @property
    def size(self) -> int:
        return self.attention_ranks + self.expert_ranks

    def role(self, rank: int) -> Role:
        return "attention" if rank < self.attention_ranks else "expert"

    def expert_index(self, rank: int) -> int:
        """Global rank -> index among expert ranks."""
        return rank - self.attention_ranks

    def describe(self, rank: int) -> str:
        if self.role(rank) == "attention":
            return f"attention rank {rank}"
        return f"expert rank {self.expert_index(rank)} (global rank {rank})"


class Watchdog:
    """Ends the process if an armed wait outlives its timeout plus a margin; the backstop behind the
    backends' own timeouts (which should fire first)."""

    def __init__(self, on_expire: Callable[[str], None], poll_s: float = 0.5, min_margin_s: float = 5.0):
        self.on_expire = on_expire
        self.poll_s = poll_s
        self.min_margin_s = min_margin_s
        self._armed: tuple[str, float, float] | None = None  # (what, started, deadline seconds)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="moeserve-watchdog", daemon=True)
        self._thread.start()

    def margin(self, timeout_s: float) -> float:
        return max(self.min_margin_s, 0.25 * timeout_s)

    @contextmanager
    def watch(self, what: str, timeout_s: float) -> Iterator[None]:
        with self._lock:
            self._armed = (what, time.monotonic(), timeout_s + self.margin(timeout_s))
        try:
            yield
        finally:
            with self._lock:
                self._armed = None

    def _run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            with self._lock:
                armed = self._armed
            if armed is not None and time.monotonic() - armed[1] > armed[2]:
                self.on_expire(f"watchdog: {armed[0]} still waiting after {armed[2]:g} s")
                os._exit(3)


class EPWorld:
    """This rank's view of the world. Build with `init_world`; tests may build one around any group."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        layout: WorldLayout,
        device: torch.device,
        timeout_s: float,
        watchdog: Watchdog | None = None,
        startup_group: dist.ProcessGroup | None = None,
        startup_timeout_s: float | None = None,
    ):
        self.group = group  # every step's collectives; they time out after timeout_s
        self.rank = rank
        self.layout = layout
        self.device = device
        self.timeout_s = timeout_s
        self.watchdog = watchdog
        self.startup_group = startup_group or group  # the same ranks, with the startup timeout
        self.startup_timeout_s = startup_timeout_s or timeout_s
        self.between_steps: BetweenSteps | None = None  # every rank installs one, or none does

    @property
    def role(self) -> Role:
        return self.layout.role(self.rank)

    @property
    def name(self) -> str:
        return self.layout.describe(self.rank)

    # collectives
    def all_to_all(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        what: str,
    ) -> dist.Work:
        """Start a variable-split all-to-all over dim 0 (rows) of `input` into `output`."""
        try:
            work = dist.all_to_all_single(
                output, input, output_splits, input_splits, group=self.group, async_op=True
            )
        except RuntimeError as e:
            raise self._error(what, e) from e
        assert work is not None
        return work

    def wait(self, works: list[dist.Work], what: str, timeout_s: float | None = None) -> None:
        timeout_s = timeout_s or self.timeout_s
        try:
            with self._watch(what, timeout_s):
                for work in works:
                    work.wait()
        except RuntimeError as e:
            raise self._error(what, e, timeout_s) from e

    def wait_for_all_ranks(self) -> None:
        """Startup barrier: every rank has joined and loaded its weights (waits the startup timeout).

        Ranks load at different speeds; the per-step timeout starts counting only after this."""
        flag = torch.zeros(1, device=self.device)
        what = "startup (waiting for every rank to load its weights)"
        try:
            work = dist.all_reduce(flag, group=self.startup_group, async_op=True)
        except RuntimeError as e:
            raise self._error(what, e, self.startup_timeout_s) from e
        assert work is not None
        self.wait([work], what, self.startup_timeout_s)  # [1] SUM: a barrier

    def start_count_exchange(self, send: torch.Tensor, what: str) -> tuple[torch.Tensor, dist.Work]:
        """send [N] int64 rows this rank sends to each rank -> ([N] rows it receives from each, work)."""
        recv = torch.empty_like(send)
        splits = [1] * self.layout.size
        return recv, self.all_to_all(recv, send, splits, splits, what)  # [N] -> [N]

    def exchange_counts(self, send: torch.Tensor, what: str) -> list[int]:
        """`start_count_exchange`, waited for: [N] rows received from each rank."""
        recv, work = self.start_count_exchange(send, what)
        self.wait([work], what)
        return recv.tolist()

    def control(self, mine: StepControl) -> StepControl:
        """Every rank, at the start of every step: the element-wise MAX of what each rank says.

        The one lockstep collective of offline generation and of serving alike: any rank with work
        makes every rank step (an idle one with an empty batch), the most micro-batches asked for is
        what every rank runs, and any rank asking to stop makes all leave in the same iteration.
        When any rank asks (`between`, or its `between_steps.wanted()`), every rank runs its
        `between_steps` action here, before the step, in the same iteration."""
        hook = self.between_steps
        asks = mine.between or (hook is not None and hook.wanted())
        work, micro_batches, stop, between = self._max_over_ranks(
            [int(mine.work), mine.micro_batches, int(mine.stop), int(asks)], "step control"
        )
        agreed = StepControl(bool(work), micro_batches, bool(stop), bool(between))
        if hook is not None and not agreed.stop:
            hook.observe(agreed)
        if agreed.between and not agreed.stop:
            if hook is None:
                raise CollectiveError(f"{self.name}: a rank asked for a between-steps action this rank lacks")
            hook.run()
        return agreed

    def _max_over_ranks(self, values: list[int], what: str) -> list[int]:
        """Element-wise MAX of `values` over every rank of the world (all of them must call it)."""
        flags = torch.tensor(values, dtype=torch.long, device=self.device)  # [n]
        try:
            work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        except RuntimeError as e:
            raise self._error(what, e) from e
        assert work is not None
        self.wait([work], what)  # [n] MAX over all ranks
        return [int(v) for v in flags.tolist()]

    def _watch(self, what: str, timeout_s: float) -> AbstractContextManager[None]:
        return self.watchdog.watch(f"{self.name}: {what}", timeout_s) if self.watchdog else _nothing()

    def _error(self, what: str, cause: BaseException, timeout_s: float | None = None) -> CollectiveError:
        return CollectiveError(
            f"{self.name}: {what} failed (a peer died, hung or left the lockstep; "
            f"timeout {timeout_s or self.timeout_s:g} s): {str(cause).splitlines()[0][:300]}"
        )


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def default_device(backend: Backend, rank: int) -> torch.device:
    """CPU for gloo; for NCCL one GPU per rank (rank modulo the GPUs on this host)."""
    if backend == "gloo":
        return torch.device("cpu")
    return torch.device("cuda", rank % max(torch.cuda.device_count(), 1))


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one world meet, and the secret that proves they belong to it."""

    host: str
    port: int
    secret: bytes


def new_secret() -> bytes:
    """A per-instance rendezvous secret; the launcher hands it to every rank of that instance only."""
    return secrets.token_bytes(32)


def host_store(address: str, timeout_s: float) -> dist.TCPStore:
    """A world's rendezvous TCPStore listening on `address` only (port chosen by the OS).

    TCPStore itself listens on every interface whatever host name it is given, so the socket is
    bound here and handed over (`master_listen_fd`); the store owns it from then on."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((address, 0))
        sock.listen(128)
        store = dist.TCPStore(
            address,
            sock.getsockname()[1],
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            master_listen_fd=sock.fileno(),
        )
    except BaseException:
        sock.close()
        raise
    sock.detach()
    return store


def prove_membership(
    group: dist.ProcessGroup, rank: int, size: int, secret: bytes, device: torch.device
) -> None:
    """Every rank shows every other that it holds the instance's secret (HMAC-SHA256 of a fresh
    nonce from rank 0 and its rank); raises `CollectiveError` naming a rank that cannot.

    The TCPStore cannot authenticate its clients, so anyone who reaches it during start-up could
    try to take a rank's place in the rendezvous; such a world never serves."""
    nonce = torch.tensor(list(os.urandom(16)) if rank == 0 else [0] * 16, dtype=torch.long, device=device)
    dist.broadcast(nonce, src=0, group=group)  # [16] bytes as int64

    def tag(r: int) -> list[int]:
        return list(hmac.new(secret, bytes(nonce.tolist()) + r.to_bytes(4, "big"), hashlib.sha256).digest())

    mine = torch.tensor(tag(rank), dtype=torch.long, device=device)  # [32]
    tags = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(tags, mine, group=group)  # size x [32]
    for r, got in enumerate(tags):
        if not hmac.compare_digest(bytes(got.tolist()), bytes(tag(r))):
            raise CollectiveError(f"rank {r} does not hold this instance's secret; refusing to serve with it")


def init_world(
    rank: int,
    layout: WorldLayout,
    store_host: str,
    store_port: int,
    secret: bytes,
    backend: Backend = "gloo",
    timeout_s: float = 60.0,
    startup_timeout_s: float = 600.0,
    device: torch.device | None = None,
    on_watchdog: Callable[[str], None] | None = None,
) -> EPWorld:
    """Join the world through the launcher's TCPStore, then prove to every rank that this one holds
    the instance's `secret` (and check that they do).

    Rendezvous and `wait_for_all_ranks` wait up to `startup_timeout_s`; every step's collectives
    run on a second group over the same ranks whose timeout is `timeout_s`."""
    startup = datetime.timedelta(seconds=startup_timeout_s)
    device = device or default_device(backend, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore(store_host, store_port, is_master=False, timeout=startup)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=layout.size,
        timeout=startup,
        device_id=device if device.type == "cuda" else None,
    )
    startup_group = dist.group.WORLD
    group = dist.new_group(list(range(layout.size)), timeout=datetime.timedelta(seconds=timeout_s))
    assert isinstance(startup_group, dist.ProcessGroup) and isinstance(group, dist.ProcessGroup)
    prove_membership(startup_group, rank, layout.size, secret, device)
    watchdog = Watchdog(on_watchdog or _print_to_stderr)
    return EPWorld(group, rank, layout, device, timeout_s, watchdog, startup_group, startup_timeout_s)


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
