"""Prometheus metrics of one serving process, in its own registry (several servers may share a
process in tests). Every name starts with `contract.METRICS_PREFIX`.

Counters and histograms are fed by the engine's observer hooks (on the engine thread); gauges
(running, waiting, KV blocks) and the per-expert token counts are read from the engine when scraped,
so they are current even while the engine is idle. With local expert ranks the engines live in
rank processes: there an `EventRecorder` (`engine.observe`) collects the hook calls as plain data
(`EngineEvents`) and `RankGauges` snapshots, which the front end relays into `apply` and `bind_ranks`.
The prefix cache's counters (`prefix_cache_queried_tokens`, `prefix_cache_hit_tokens`) carry a
`rank` label (the attention rank; 0 for a single-process engine) and are read from the engine's own
totals when scraped, as the per-expert counts are.
Nothing here changes engine behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from moeserve import contract
from moeserve.workers.engine.core import Engine, EngineObserver
from moeserve.workers.engine.loop import EngineLoop
from moeserve.workers.engine.observe import HELP, LATENCY_BUCKETS, EngineEvents, ExpertCounts, RankGauges
from moeserve.workers.engine.prefix_cache import PrefixCache
from moeserve.workers.engine.request import FinishReason, Request
from moeserve.workers.engine.runner import ExpertLoad
from moeserve.workers.server.balance_metrics import BalanceCollector

P = contract.METRICS_PREFIX


class _ExpertLoadCollector(Collector):
    """moeserve_expert_tokens_total{layer, expert}: tokens the router sent to each routed expert."""

    def __init__(self) -> None:
        self.load: ExpertCounts | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(f"{P}expert_tokens", HELP["expert_tokens"], labels=["layer", "expert"])
        if self.load is not None:
            for layer, counts in self.load.snapshot().items():
                for expert, n in enumerate(counts):
                    family.add_metric([str(layer), str(expert)], n)
        yield family


class _PrefixCacheCollector(Collector):
    """moeserve_prefix_cache_{queried,hit}_tokens_total{rank}: each rank's prefix-cache totals."""

    def __init__(self) -> None:
        self.totals: Callable[[], list[tuple[int, int, int]]] = list  # (rank, queried, hit)

    def collect(self) -> Iterator[CounterMetricFamily]:
        queried, hit = (
            CounterMetricFamily(f"{P}{name}", HELP[name], labels=["rank"])
            for name in ("prefix_cache_queried_tokens", "prefix_cache_hit_tokens")
        )
        for rank, q, h in self.totals():
            queried.add_metric([str(rank)], q)
            hit.add_metric([str(rank)], h)
        yield queried
        yield hit


class ServingMetrics(EngineObserver):
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{P}requests", HELP["requests"], ["finish_reason"], registry=r)
        for reason in ("stop", "length", "abort"):
            self.requests.labels(reason)
        self.prompt_tokens = Counter(f"{P}prompt_tokens", HELP["prompt_tokens"], registry=r)
        self.generated_tokens = Counter(f"{P}generated_tokens", HELP["generated_tokens"], registry=r)
        self.preemptions = Counter(f"{P}preemptions", HELP["preemptions"], registry=r)
        self.ttft, self.itl = (
            Histogram(f"{P}{name}", HELP[name], buckets=LATENCY_BUCKETS, registry=r)
            for name in ("time_to_first_token_seconds", "inter_token_latency_seconds")
        )
        self.running = Gauge(f"{P}requests_running", HELP["requests_running"], registry=r)
        self.waiting = Gauge(f"{P}requests_waiting", HELP["requests_waiting"], registry=r)
        self.kv_used = Gauge(f"{P}kv_blocks_used", HELP["kv_blocks_used"], registry=r)
        self.kv_free = Gauge(f"{P}kv_blocks_free", HELP["kv_blocks_free"], registry=r)
        self.kv_cached = Gauge(f"{P}kv_blocks_cached", HELP["kv_blocks_cached"], registry=r)
        self.spec_draft, self.spec_accepted = (
            Counter(f"{P}{name}", HELP[name], ["position"], registry=r)
            for name in ("spec_draft_tokens", "spec_accepted_tokens")
        )
        self._experts = _ExpertLoadCollector()
        r.register(self._experts)
        self._prefix = _PrefixCacheCollector()
        r.register(self._prefix)
        self._balance = BalanceCollector()
        r.register(self._balance)

    def on_speculation(self, proposed: int, accepted: int) -> None:
        for position in range(proposed):  # acceptance rate at i = accepted{i} / draft{i}
            self.spec_draft.labels(str(position)).inc()
            if position < accepted:
                self.spec_accepted.labels(str(position)).inc()

    def bind(self, loop: EngineLoop, expert_load: ExpertLoad | None) -> None:
        """Read gauges from this engine from now on."""
        engine = loop.engine
        allocator = engine.runner.allocator
        self.running.set_function(lambda: len(engine.scheduler.running))
        self.waiting.set_function(lambda: loop.num_waiting)
        self.kv_used.set_function(lambda: allocator.num_used)
        self.kv_free.set_function(lambda: allocator.num_free)
        self.kv_cached.set_function(lambda: allocator.num_cached)
        self._experts.load = expert_load
        prefix: PrefixCache = engine.scheduler.prefix
        self._prefix.totals = lambda: [(0, prefix.queried_tokens, prefix.hit_tokens)]

    def bind_ranks(self, ranks: Callable[[], list[RankGauges]]) -> None:
        """Read gauges and per-expert counts from the attention ranks' latest reports, summed."""
        self.running.set_function(lambda: sum(g.running for g in ranks()))
        self.waiting.set_function(lambda: sum(g.waiting for g in ranks()))
        self.kv_used.set_function(lambda: sum(g.kv_blocks_used for g in ranks()))
        self.kv_free.set_function(lambda: sum(g.kv_blocks_free for g in ranks()))
        self.kv_cached.set_function(lambda: sum(g.kv_blocks_cached for g in ranks()))
        self._experts.load = _SummedExpertCounts(ranks)
        self._balance.ranks = ranks
        self._prefix.totals = lambda: [
            (g.rank, g.prefix_queried_tokens, g.prefix_hit_tokens) for g in ranks()
        ]

    def apply(self, events: EngineEvents) -> None:
        """Record events an `EventRecorder` collected elsewhere, as if this registry had observed them."""
        if events.tokens:
            self.generated_tokens.inc(events.tokens)
        for seconds in events.ttft:
            self.ttft.observe(seconds)
        for seconds in events.itl:
            self.itl.observe(seconds)
        for reason, n in events.finished.items():
            self.requests.labels(reason).inc(n)
        if events.prompt_tokens:
            self.prompt_tokens.inc(events.prompt_tokens)
        if events.preemptions:
            self.preemptions.inc(events.preemptions)
        for position, n in events.spec_draft.items():
            self.spec_draft.labels(str(position)).inc(n)
            self.spec_accepted.labels(str(position)).inc(events.spec_accepted.get(position, 0))

    # EngineObserver
    def on_step(self, engine: Engine, num_tokens: int, num_preempted: int) -> None:
        if num_preempted:
            self.preemptions.inc(num_preempted)

    def on_token(self, request: Request, seconds_since_previous: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(seconds_since_previous)
        self.generated_tokens.inc()

    def on_finish(self, request: Request, reason: FinishReason) -> None:
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(len(request.prompt_ids))


class _SummedExpertCounts:
    def __init__(self, ranks: Callable[[], list[RankGauges]]):
        self.ranks = ranks

    def snapshot(self) -> dict[int, list[int]]:
        total: dict[int, list[int]] = {}
        for gauges in self.ranks():
            for layer, counts in gauges.expert_tokens.items():
                have = total.setdefault(layer, [0] * len(counts))
                total[layer] = [a + b for a, b in zip(have, counts, strict=True)]
        return total
