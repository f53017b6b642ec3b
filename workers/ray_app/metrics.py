"""An attention rank's engine metrics under Ray, exported by Ray's per-node metrics agent.

Same names and meanings as the single-process server's `server.metrics.ServingMetrics`; Ray's
exporter adds the `ray_` prefix (`ray_moeserve_generated_tokens_total`, ...) and every series
carries `instance` (the Serve replica owning the model instance) and `rank`. Scrape each node's
`ray start --metrics-export-port` (the operator sets it to the MoEService's metrics port).
The engine thread only records events (`EventRecorder`, cheap); the rank actor hands them and the
engine's gauges to `record` about twice a second, idle or not, so Ray's metric calls stay off the
decode path.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from moeserve import contract
from moeserve.workers.engine.observe import HELP, LATENCY_BUCKETS, EngineEvents, RankGauges

P = contract.METRICS_PREFIX
TAGS = ("instance", "rank")


class RankMetrics:
    def __init__(self, instance: str, rank: int):
        self.tags = {"instance": instance, "rank": str(rank)}
        self.requests = Counter(f"{P}requests", HELP["requests"], (*TAGS, "finish_reason"))
        self.prompt_tokens = Counter(f"{P}prompt_tokens", HELP["prompt_tokens"], TAGS)
        self.generated_tokens = Counter(f"{P}generated_tokens", HELP["generated_tokens"], TAGS)
        self.preemptions = Counter(f"{P}preemptions", HELP["preemptions"], TAGS)
        self.ttft, self.itl = (
            Histogram(f"{P}{name}", HELP[name], list(LATENCY_BUCKETS), TAGS)
            for name in ("time_to_first_token_seconds", "inter_token_latency_seconds")
        )
        self.running = Gauge(f"{P}requests_running", HELP["requests_running"], TAGS)
        self.waiting = Gauge(f"{P}requests_waiting", HELP["requests_waiting"], TAGS)
        self.kv_used = Gauge(f"{P}kv_blocks_used", HELP["kv_blocks_used"], TAGS)
        self.kv_free = Gauge(f"{P}kv_blocks_free", HELP["kv_blocks_free"], TAGS)
        self.kv_cached = Gauge(f"{P}kv_blocks_cached", HELP["kv_blocks_cached"], TAGS)
        self.prefix_queried, self.prefix_hit = (
            Counter(f"{P}{name}", HELP[name], TAGS)
            for name in ("prefix_cache_queried_tokens", "prefix_cache_hit_tokens")
        )
        self._prefix_reported = (0, 0)  # (queried, hit) totals already counted
        self.expert_tokens = Counter(f"{P}expert_tokens", HELP["expert_tokens"], (*TAGS, "layer", "expert"))
        self.spec_draft, self.spec_accepted = (
            Counter(f"{P}{name}", HELP[name], (*TAGS, "position"))
            for name in ("spec_draft_tokens", "spec_accepted_tokens")
        )
        self._experts_reported: dict[int, list[int]] = {}

    def record(self, events: EngineEvents, now: RankGauges) -> None:
        """Engine events since the last call, gauges as they are now, per-expert counts since then."""
        tags = self.tags
        if events.tokens:
            self.generated_tokens.inc(events.tokens, tags)
        for seconds in events.ttft:
            self.ttft.observe(seconds, tags)
        for seconds in events.itl:
            self.itl.observe(seconds, tags)
        for reason, n in events.finished.items():
            self.requests.inc(n, {**tags, "finish_reason": reason})
        if events.prompt_tokens:
            self.prompt_tokens.inc(events.prompt_tokens, tags)
        if events.preemptions:
            self.preemptions.inc(events.preemptions, tags)
        for position, n in events.spec_draft.items():  # a counter that only counted 0 is not exported
            self.spec_draft.inc(n, {**tags, "position": str(position)})
            if events.spec_accepted.get(position):
                self.spec_accepted.inc(events.spec_accepted[position], {**tags, "position": str(position)})
        self.running.set(now.running, tags)
        self.waiting.set(now.waiting, tags)
        self.kv_used.set(now.kv_blocks_used, tags)
        self.kv_free.set(now.kv_blocks_free, tags)
        self.kv_cached.set(now.kv_blocks_cached, tags)
        queried, hit = self._prefix_reported
        if now.prefix_queried_tokens > queried:
            self.prefix_queried.inc(now.prefix_queried_tokens - queried, tags)
        if now.prefix_hit_tokens > hit:
            self.prefix_hit.inc(now.prefix_hit_tokens - hit, tags)
        self._prefix_reported = (now.prefix_queried_tokens, now.prefix_hit_tokens)
        for layer, counts in now.expert_tokens.items():
            before = self._experts_reported.get(layer, [0] * len(counts))
            for expert, (total, then) in enumerate(zip(counts, before, strict=True)):
                if total > then:
                    self.expert_tokens.inc(total - then, {**tags, "layer": str(layer), "expert": str(expert)})
            self._experts_reported[layer] = counts
