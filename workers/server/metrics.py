"""Prometheus metrics of one serving process, in its own registry (several servers may share a
process in tests). Every name starts with `contract.METRICS_PREFIX`.

Counters and histograms are fed by the engine's observer hooks (on the engine thread); gauges
(running, waiting, KV blocks) and the per-expert token counts are read from the engine when scraped,
so they are current even while the engine is idle. Nothing here changes engine behaviour.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from moeserve import contract
from moeserve.workers.engine.core import Engine, EngineObserver
from moeserve.workers.engine.loop import EngineLoop
from moeserve.workers.engine.request import FinishReason, Request
from moeserve.workers.engine.runner import ExpertLoad

P = contract.METRICS_PREFIX
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _ExpertLoadCollector(Collector):
    """moeserve_expert_tokens_total{layer, expert}: tokens the router sent to each routed expert."""

    def __init__(self) -> None:
        self.load: ExpertLoad | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            f"{P}expert_tokens",
            "Tokens routed to each routed expert, by MoE layer",
            labels=["layer", "expert"],
        )
        if self.load is not None:
            for layer, counts in self.load.snapshot().items():
                for expert, n in enumerate(counts):
                    family.add_metric([str(layer), str(expert)], n)
        yield family


class ServingMetrics(EngineObserver):
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{P}requests", "Finished requests by finish reason", ["finish_reason"], registry=r
        )
        for reason in ("stop", "length", "abort"):
            self.requests.labels(reason)
        self.prompt_tokens = Counter(f"{P}prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter(f"{P}generated_tokens", "Tokens generated", registry=r)
        self.preemptions = Counter(f"{P}preemptions", "Requests preempted for lack of KV blocks", registry=r)
        self.ttft = Histogram(
            f"{P}time_to_first_token_seconds",
            "From arrival to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{P}inter_token_latency_seconds",
            "Between consecutive generated tokens of one request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge(f"{P}requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge(f"{P}requests_waiting", "Requests waiting to be admitted", registry=r)
        self.kv_used = Gauge(f"{P}kv_blocks_used", "KV-cache blocks holding tokens", registry=r)
        self.kv_free = Gauge(f"{P}kv_blocks_free", "KV-cache blocks free", registry=r)
        self._experts = _ExpertLoadCollector()
        r.register(self._experts)

    def bind(self, loop: EngineLoop, expert_load: ExpertLoad | None) -> None:
        """Read gauges from this engine from now on."""
        engine = loop.engine
        allocator = engine.runner.allocator
        self.running.set_function(lambda: len(engine.scheduler.running))
        self.waiting.set_function(lambda: loop.num_waiting)
        self.kv_used.set_function(lambda: allocator.num_used)
        self.kv_free.set_function(lambda: allocator.num_free)
        self._experts.load = expert_load

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
