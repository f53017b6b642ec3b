"""An attention rank's engine metrics under Ray, exported by Ray's per-node metrics agent.

Same names and meanings as the single-process server's `server.metrics.ServingMetrics`; Ray's
exporter adds the `ray_` prefix (`ray_moeserve_generated_tokens_total`, ...) and every series
carries `instance` (the Serve replica owning the model instance) and `rank`. Scrape each node's
`ray start --metrics-export-port` (the operator sets it to the MoEService's metrics port).
Counters and histograms are fed by the engine's observer hooks; gauges and per-expert token counts
are refreshed by `refresh`, which the rank actor calls about once a second, idle or not.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from moeserve import contract
from moeserve.workers.engine.core import Engine, EngineObserver
from moeserve.workers.engine.request import FinishReason, Request
from moeserve.workers.ep_serving import AttentionRank
from moeserve.workers.server.metrics import LATENCY_BUCKETS

P = contract.METRICS_PREFIX
TAGS = ("instance", "rank")


class RankMetrics(EngineObserver):
    def __init__(self, instance: str, rank: int):
        self.tags = {"instance": instance, "rank": str(rank)}
        by_reason = (*TAGS, "finish_reason")
        self.requests = Counter(f"{P}requests", "Finished requests by finish reason", by_reason)
        self.prompt_tokens = Counter(f"{P}prompt_tokens", "Prompt tokens of finished requests", TAGS)
        self.generated_tokens = Counter(f"{P}generated_tokens", "Tokens generated", TAGS)
        self.preemptions = Counter(f"{P}preemptions", "Requests preempted for lack of KV blocks", TAGS)
        self.ttft = Histogram(
            f"{P}time_to_first_token_seconds",
            "From arrival to the first generated token",
            list(LATENCY_BUCKETS),
            TAGS,
        )
        self.itl = Histogram(
            f"{P}inter_token_latency_seconds",
            "Between consecutive generated tokens of one request",
            list(LATENCY_BUCKETS),
            TAGS,
        )
        self.running = Gauge(f"{P}requests_running", "Requests in the running batch", TAGS)
        self.waiting = Gauge(f"{P}requests_waiting", "Requests waiting to be admitted", TAGS)
        self.kv_used = Gauge(f"{P}kv_blocks_used", "KV-cache blocks holding tokens", TAGS)
        self.kv_free = Gauge(f"{P}kv_blocks_free", "KV-cache blocks free", TAGS)
        by_expert = (*TAGS, "layer", "expert")
        self.expert_tokens = Counter(
            f"{P}expert_tokens", "Tokens routed to each expert, by MoE layer", by_expert
        )
        self._experts_reported: dict[int, list[int]] = {}

    def refresh(self, rank: AttentionRank) -> None:
        """Gauges from the engine as it is now; per-expert counts since the last refresh."""
        tags, now = self.tags, rank.gauges()
        self.running.set(now.running, tags)
        self.waiting.set(now.waiting, tags)
        self.kv_used.set(now.kv_blocks_used, tags)
        self.kv_free.set(now.kv_blocks_free, tags)
        for layer, counts in now.expert_tokens.items():
            before = self._experts_reported.get(layer, [0] * len(counts))
            for expert, (total, then) in enumerate(zip(counts, before, strict=True)):
                if total > then:
                    self.expert_tokens.inc(total - then, {**tags, "layer": str(layer), "expert": str(expert)})
            self._experts_reported[layer] = counts

    # EngineObserver (engine thread)
    def on_step(self, engine: Engine, num_tokens: int, num_preempted: int) -> None:
        if num_preempted:
            self.preemptions.inc(num_preempted, self.tags)

    def on_token(self, request: Request, seconds_since_previous: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(seconds_since_previous, self.tags)
        self.generated_tokens.inc(1, self.tags)

    def on_finish(self, request: Request, reason: FinishReason) -> None:
        self.requests.inc(1, {**self.tags, "finish_reason": reason})
        self.prompt_tokens.inc(len(request.prompt_ids), self.tags)
