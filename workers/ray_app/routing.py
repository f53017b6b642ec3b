"""Which model instance a request goes to: Serve's request-router hook, told about rebuilds.

Serve's default router picks the less busy of two instances, and an instance that is rebuilding its
ranks has nothing in flight, so it looks like the best choice while it can serve nothing. Each
`ModelInstance` reports `{"ready": bool}` from `record_routing_stats` (Serve polls it every
`ROUTING_STATS_PERIOD_S`); this router samples two instances among the ready ones and falls back to
all of them only when none is ready (then requests wait for the rebuild, as they would anyway).
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

READY_STAT = "ready"
ROUTING_STATS_PERIOD_S = 1.0


def ready_first(candidates: list[RunningReplica], sample: int = 2) -> list[list[RunningReplica]]:
    """One routing round: up to `sample` random ready candidates (unknown counts as ready), else any.
    Serve sends the request to the least loaded of the group that accepts it."""
    ready = [r for r in candidates if r.routing_stats.get(READY_STAT, True)]
    pool = ready or list(candidates)
    return [random.sample(pool, min(sample, len(pool)))] if pool else []


class ReadyInstancesFirst(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        return ready_first(candidate_replicas)


def router_config() -> RequestRouterConfig:
    fields: dict[str, Any] = {  # a dict: Ray's pydantic model is mis-typed for mypy
        "request_router_class": ReadyInstancesFirst,
        "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
    }
    return RequestRouterConfig(**fields)
