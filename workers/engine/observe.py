"""What an engine reports, as plain data: metric names and help texts, latency buckets, the observer
calls of a rank's engine (`EventRecorder` -> `EngineEvents`) and its gauges (`RankGauges`).

Both front ends read these: the plain gRPC server's Prometheus registry (`server.metrics`) and the
Ray Serve app's `ray.util.metrics` (`ray_app.metrics`). No Prometheus or Ray imports here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

from moeserve.workers.engine.core import Engine, EngineObserver
from moeserve.workers.engine.request import FinishReason, Request

# Every metric once: name (after the prefix) -> help text; the Ray path (serve_metrics.py) uses the same.
HELP = {
    "requests": "Finished requests by finish reason",
    "prompt_tokens": "Prompt tokens of finished requests",
    "generated_tokens": "Tokens generated",
    "preemptions": "Requests preempted for lack of KV blocks",
    "time_to_first_token_seconds": "From arrival to the first generated token",
    "inter_token_latency_seconds": "Between consecutive generated tokens of one request",
    "requests_running": "Requests in the running batch",
    "requests_waiting": "Requests waiting to be admitted",
    "kv_blocks_used": "KV-cache blocks holding tokens",
    "kv_blocks_free": "KV-cache blocks free",
    "kv_blocks_cached": "KV-cache blocks in the prefix cache (in use or evictable)",
    "prefix_cache_queried_tokens": "Prompt tokens of admitted requests looked up in the prefix cache",
    "prefix_cache_hit_tokens": "Prompt tokens taken from the prefix cache instead of computed",
    "expert_tokens": "Tokens routed to each routed expert, by MoE layer",
    "spec_draft_tokens": "MTP draft tokens proposed and verified, by draft position (0 = first)",
    "spec_accepted_tokens": "MTP draft tokens accepted, by draft position (0 = first)",
}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ExpertCounts(Protocol):
    def snapshot(self) -> dict[int, list[int]]:
        """layer -> tokens routed to each expert so far."""
        ...


@dataclass
class EngineEvents:
    """Observer calls since the last drain, as plain data that can cross a process boundary."""

    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests
    prompt_tokens: int = 0
    preemptions: int = 0
    spec_draft: dict[int, int] = field(default_factory=dict)  # draft position -> drafts verified
    spec_accepted: dict[int, int] = field(default_factory=dict)  # draft position -> drafts accepted


@dataclass(frozen=True)
class RankGauges:
    """An attention rank's engine as it is now (`AttentionRank.gauges`)."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    expert_tokens: dict[int, list[int]]  # layer -> tokens routed to each expert so far
    rank: int = 0  # the attention rank reporting
    kv_blocks_cached: int = 0
    prefix_queried_tokens: int = 0  # so far (`PrefixCache.queried_tokens`)
    prefix_hit_tokens: int = 0
    expert_rank_tokens: list[int] = field(default_factory=list)  # rows sent to each expert rank, last step
    rebalances: int = 0  # expert-map changes so far (every rank counts the same)
    expert_map: dict[int, list[list[int]]] = field(default_factory=dict)  # layer -> experts per expert rank


class EventRecorder(EngineObserver):
    """Collects an engine's observer calls for a registry in another process; `drain` is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events = EngineEvents()

    def drain(self) -> EngineEvents:
        with self._lock:
            events, self._events = self._events, EngineEvents()
        return events

    def on_step(self, engine: Engine, num_tokens: int, num_preempted: int) -> None:
        if num_preempted:
            with self._lock:
                self._events.preemptions += num_preempted

    def on_token(self, request: Request, seconds_since_previous: float, first: bool) -> None:
        with self._lock:
            self._events.tokens += 1
            (self._events.ttft if first else self._events.itl).append(seconds_since_previous)

    def on_finish(self, request: Request, reason: FinishReason) -> None:
        with self._lock:
            self._events.finished[reason] = self._events.finished.get(reason, 0) + 1
            self._events.prompt_tokens += len(request.prompt_ids)

    def on_speculation(self, proposed: int, accepted: int) -> None:
        with self._lock:
            for position in range(proposed):
                draft, kept = self._events.spec_draft, self._events.spec_accepted
                draft[position] = draft.get(position, 0) + 1
                kept[position] = kept.get(position, 0) + int(position < accepted)
