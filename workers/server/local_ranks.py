"""The gRPC process's side of an expert-parallel instance made of local rank processes.

`EPFrontend` starts A attention-rank and E expert-rank processes (`server.rank_process`, running the
`ranks.serving` programs over gloo) through the shared launcher (`parallel.launch`: rendezvous
through a TCPStore on 127.0.0.1 only, closed once every rank has joined; the ranks prove to each
other that they hold a secret only this instance's ranks get) and stands in for `EngineLoop` behind
the servicer: it validates each request against a never-stepped twin of the ranks' engine, sends it
to an attention rank by cache-aware routing (`engine.prefix_routing`: the rank believed to hold the
longest cached prefix of the prompt unless it has more than `route_margin` requests in flight beyond
the least loaded rank; otherwise the least loaded; with prefix caching off, the least loaded), and
relays that rank's `RequestOutput`s to the request's sink. Aborts go to the rank that holds the
request. If any rank dies or fails, every stream in flight ends with abort cause "unavailable" and
the failure's own message, the rest of the ranks are killed, `alive` turns False (health
NOT_SERVING) and the gauges read idle. A rank that refuses one request (queue full, invalid) ends
that stream alone with its own cause. Ray-hosted instances do not use this module.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moeserve.engine_settings import EngineSettings
from moeserve.workers.engine.loop import EngineFailed, EngineStopped, QueueFull
from moeserve.workers.engine.observe import RankGauges
from moeserve.workers.engine.prefix_routing import LOAD_MARGIN, PrefixIndex
from moeserve.workers.engine.request import AbortCause, RequestOutput, SamplingParams, Sink
from moeserve.workers.engine.validation import validation_engine
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.tokenizer import Tokenizer
from moeserve.workers.parallel.launch import RankProcesses
from moeserve.workers.parallel.settings import EPSettings
from moeserve.workers.ranks.serving import ServingRankSpec
from moeserve.workers.server.convert import model_info
from moeserve.workers.server.metrics import ServingMetrics
from moeserve.workers.server.rank_process import rank_main
from moeserve.workers.server.servicer import Backend

log = logging.getLogger(__name__)
ANSWER_S = 10.0  # how long an admin ask waits for attention rank 0 beyond its own timeout
INSTANCE = "local"  # the one model instance's name in admin answers (Ray names its replicas)


class EPFrontend:
    """A + E local rank processes behind the `EngineLoop` interface the servicer uses."""

    def __init__(
        self,
        spec: ServingRankSpec,
        tokenizer: Tokenizer | None,
        on_failure: Callable[[BaseException], None] | None = None,
        metrics: ServingMetrics | None = None,
    ):
        self.spec = spec
        self.metrics = metrics
        self._gauges: dict[int, RankGauges] = {}  # attention rank -> its latest report
        if metrics is not None:
            metrics.bind_ranks(lambda: list(self._gauges.values()))
        self.layout = spec.ep.layout
        self.engine = validation_engine(spec.model_path, spec.engine, tokenizer)
        self.on_failure = on_failure
        self.failure: BaseException | None = None
        self._engine_failure: str | None = None  # first failed rank engine's error, with its root cause
        self._stopping = False
        self._lock = threading.Lock()
        self._keys = iter(range(1 << 62))
        self._sinks: dict[int, tuple[int, Sink]] = {}  # key -> (attention rank, sink)
        self._load = [0] * self.layout.attention_ranks  # requests in flight per attention rank
        self._ranks = list(range(self.layout.attention_ranks))
        self._prefixes: PrefixIndex[int] = PrefixIndex(spec.engine.block_size, spec.engine.num_blocks - 1)
        self.route_margin = LOAD_MARGIN  # see engine.prefix_routing.choose
        self._ready: set[int] = set()
        self._stats: dict[int, dict[str, int]] = {}
        self._asks: dict[int, list[Any]] = {}  # token of an admin ask -> where its answer goes

    # lifecycle
    def start(self) -> EPFrontend:
        self.ranks = RankProcesses(
            self.layout, "moeserve.workers.ranks.serving", self.spec.ep.startup_timeout_s
        )
        self._outbox = self.ranks.ctx.Queue()
        self._inboxes = [self.ranks.ctx.Queue() for _ in range(self.layout.attention_ranks)]
        attention = self.layout.attention_ranks

        def args_of(rank: int) -> tuple[Any, ...]:
            return (self.spec, self._inboxes[rank] if rank < attention else None, self._outbox)

        self.ranks.start(rank_main, args_of, daemon=True)
        self._pump_thread = threading.Thread(target=self._pump, name="moeserve-ep-frontend", daemon=True)
        self._pump_thread.start()
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self._ready) < self.layout.attention_ranks:
            if self.failure is not None:
                raise EngineFailed(f"a rank failed while loading: {self.failure}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks not ready after {timeout_s:g} s")
            time.sleep(0.05)
        self.ranks.close_store()

    def rank_stats(self, timeout_s: float = 10.0) -> list[dict[str, int]]:
        """Fresh counters of every attention rank (`AttentionRank.stats`)."""
        self._stats.clear()
        for inbox in self._inboxes:
            inbox.put(("stats",))
        deadline = time.monotonic() + timeout_s
        while len(self._stats) < self.layout.attention_ranks:
            if time.monotonic() > deadline or self.failure is not None:
                raise TimeoutError("attention ranks did not report their counters")
            time.sleep(0.01)
        return [self._stats[r] for r in range(self.layout.attention_ranks)]

    # the admin endpoints (`openai_api.admin.ExpertControl`): attention rank 0 answers; every rank
    # holds the same maps, and its rebalance request makes every rank of the instance run the check
    def expert_map(self) -> dict[str, Any]:
        return {"instances": [{"instance": INSTANCE, **self._ask(("expert_map",), ANSWER_S)}]}

    def request_rebalance(self, timeout_s: float) -> dict[str, Any]:
        answer = self._ask(("rebalance", timeout_s), timeout_s + ANSWER_S)
        return {"instances": [{"instance": INSTANCE, **answer}]}

    def _ask(self, message: tuple[Any, ...], wait_s: float) -> dict[str, Any]:
        """Send (kind, token, *rest) to attention rank 0 and wait (this thread) for its answer."""
        with self._lock:
            key = next(self._keys)
        box: list[Any] = []  # the pump appends (result, error); dropped with the ask if it times out
        self._asks[key] = box
        try:
            self._inboxes[0].put((message[0], key, *message[1:]))
            deadline = time.monotonic() + wait_s
            while not box:
                if self.failure is not None:
                    raise EngineFailed(f"an expert-parallel rank failed: {self.failure}")
                if self._stopping:
                    raise EngineStopped("engine is stopping")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"attention rank 0 did not answer {message[0]!r} within {wait_s:g} s")
                time.sleep(0.01)
        finally:
            self._asks.pop(key, None)
        result, error = box[0]
        if error is None:
            return dict(result)
        kind, text = error
        if kind == "timeout":
            raise TimeoutError(text)
        raise EngineStopped(text)

    def pid(self, rank: int) -> int:
        return self.ranks.pid(rank)

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            already = self._stopping
            self._stopping = True
        if not already and self.failure is None:
            for inbox in self._inboxes:
                inbox.put(("stop",))
        self.ranks.join(timeout or 10.0)
        self.ranks.kill_all()
        self._end_all("stopping", "server is stopping")
        self._idle_gauges()

    def _idle_gauges(self) -> None:
        """The ranks are gone: nothing runs, waits or holds a block (per-expert counts are kept)."""
        free = self.engine.runner.allocator.num_free
        self._gauges = {
            r: replace(g, running=0, waiting=0, kv_blocks_used=0, kv_blocks_free=free, kv_blocks_cached=0)
            for r, g in self._gauges.items()
        }

    # the EngineLoop interface
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def num_waiting(self) -> int:
        seqs = self.spec.engine.max_num_seqs
        return sum(max(0, n - seqs) for n in self._load)

    @property
    def alive(self) -> bool:
        return self.failure is None and not self._stopping and len(self._ready) == self.layout.attention_ranks

    def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        sink: Sink,
        request_id: str = "",
        deadline: float | None = None,
    ) -> int:
        self.engine.check(prompt_ids, sampling)
        caching = self.spec.engine.prefix_caching
        hashes = self._prefixes.hashes(prompt_ids) if caching else []  # off the lock
        with self._lock:
            if self.failure is not None:
                raise EngineFailed(f"an expert-parallel rank failed: {self.failure}")
            if self._stopping:
                raise EngineStopped("engine is stopping")
            rank = self._prefixes.choose(self._ranks, self._load, hashes, self.route_margin)
            limit = self.spec.engine.max_num_seqs + self.spec.engine.max_waiting
            if self._load[rank] >= limit:  # its queue is full: the least loaded then
                rank = min(self._ranks, key=lambda r: self._load[r])
            if self._load[rank] >= limit:
                raise QueueFull(f"every attention rank has {limit} requests")
            if caching:
                self._prefixes.record(rank, hashes)
            key = next(self._keys)
            self._sinks[key] = (rank, sink)
            self._load[rank] += 1
        timeout_s = deadline - time.monotonic() if deadline is not None else None
        message = ("submit", key, list(prompt_ids), sampling, request_id or f"req-{key}", timeout_s)
        self._inboxes[rank].put(message)
        return key

    def abort(self, key: int, cause: AbortCause = "cancelled") -> None:
        with self._lock:
            held = self._sinks.get(key)
        if held is not None and self.failure is None and not self._stopping:
            self._inboxes[held[0]].put(("abort", key))

    # relaying
    def _pump(self) -> None:
        while True:
            try:
                kind, rank, payload = self._outbox.get(timeout=0.05)
            except queue.Empty:
                kind, rank, payload = "", -1, None
            except (EOFError, OSError):
                return
            if kind == "out":
                self._deliver(rank, *payload)
            elif kind == "ready":
                self._ready.add(rank)
            elif kind == "stats":
                self._stats[rank] = payload
            elif kind == "answer":
                token, result, error = payload
                box = self._asks.get(token)
                if box is not None:
                    box.append((result, error))
            elif kind == "metrics":
                events, self._gauges[rank] = payload
                if self.metrics is not None:
                    self.metrics.apply(events)
            elif kind == "error" and not self._stopping:
                self._fail(self._root_cause(rank, payload))
            if self._stopping and not self.ranks.any_alive():
                return
            if not self._stopping and self.failure is None:
                dead = self.ranks.first_exited(besides=-1)
                if dead is not None:
                    self._fail(self.ranks.describe_exit(dead))
            if self.failure is not None:
                return

    def _root_cause(self, rank: int, message: str) -> str:
        return self.ranks.lead_with_dead_peer(rank, message)

    def _deliver(self, rank: int, key: int, out: RequestOutput) -> None:
        if out.abort_cause == "failed":  # a rank's engine failed: a peer was lost, the instance is down
            if self._engine_failure is None:  # name the dead rank, whichever side noticed first
                self._engine_failure = self._root_cause(rank, out.error or "engine failed")
            out = replace(out, abort_cause="unavailable", error=self._engine_failure)
        # any other cause (queue_full, invalid, error) is this request's alone and passes through
        with self._lock:
            held = self._sinks.get(key)
            if held is not None and out.finished:
                del self._sinks[key]
                self._load[held[0]] -= 1
        if held is not None:
            held[1](out)

    def _fail(self, message: str) -> None:
        log.error("expert-parallel instance failed: %s", message)
        with self._lock:
            if self.failure is not None:
                return
            self.failure = RuntimeError(message)
        self.ranks.kill_all()
        self._end_all("unavailable", f"model instance lost a rank: {message}")
        self._idle_gauges()
        if self.on_failure is not None:
            self.on_failure(self.failure)

    def _end_all(self, cause: AbortCause, error: str) -> None:
        with self._lock:
            pending, self._sinks = self._sinks, {}
            self._load = [0] * self.layout.attention_ranks
        for _, sink in pending.values():
            sink(RequestOutput("", [], "", "abort", abort_cause=cause, error=error))


def ep_loader(
    model_path: Path, dtype: torch.dtype, settings: EngineSettings, ep: EPSettings
) -> Callable[[ServingMetrics, Callable[[BaseException], None]], Backend]:
    """Start an expert-parallel instance of local processes; the front end is the backend's loop."""

    def load(metrics: ServingMetrics, on_failure: Callable[[BaseException], None]) -> Backend:
        spec = ServingRankSpec(Path(model_path), replace(ep, dtype=dtype), settings)
        ep.expert_placement(ModelConfig.from_file(model_path))  # PlacementError before any process
        tokenizer = Tokenizer.from_model_dir(model_path)
        frontend = EPFrontend(spec, tokenizer, on_failure, metrics).start()
        try:
            frontend.wait_ready(ep.startup_timeout_s)
        except BaseException:
            frontend.stop(1.0)
            raise
        config = ModelConfig.from_file(model_path)
        dtype_name = str(dtype).removeprefix("torch.")
        info = model_info(
            Path(model_path).name,
            config,
            frontend.engine,
            dtype_name,
            tokenizer is not None,
            ep.attention_ranks,
            ep.expert_ranks,
        )
        return Backend(frontend, tokenizer, info)

    return load
