"""Which model instance a request goes to behind Ray Serve: cache-aware routing over Serve's
request-router API, on top of `routing.ReadyInstancesFirst`'s rule about rebuilding instances.

`PrefixAffinityRouter` runs in the caller of the `ModelInstance` deployment (the ingress replica):
for a `generate` call it reads the prompt ids (the call's first argument), and among the ready
instances (all of them only when none is ready) picks the one its `PrefixIndex` believes holds the
longest cached prefix, unless that instance has more than `margin` requests in flight beyond the
least loaded one (`engine.prefix_routing.choose`: the same rule as between the attention ranks of
one instance, which the instance then applies itself). In flight is counted here, from Serve's
`on_request_routed` / `on_request_completed` hooks. The index records a prompt under the instance
Serve actually sent it to; an instance that leaves the replica set is forgotten. The preferred
instance comes first, the rest of the ready ones second, so a full replica queue falls back to them.
Other calls (`stats`) go as `ready_first` sends them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Protocol

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from moeserve.engine_settings import EngineSettings
from moeserve.workers.engine.prefix_routing import LOAD_MARGIN, PrefixIndex
from moeserve.workers.model.kv_cache import BlockHash
from moeserve.workers.ray_app.routing import READY_STAT, ROUTING_STATS_PERIOD_S, ready_first

GENERATE = "generate"  # the ModelInstance method whose first argument is the prompt's token ids


class Candidate(Protocol):
    @property
    def replica_id(self) -> Any: ...

    @property
    def routing_stats(self) -> dict[str, Any]: ...


def prompt_of(pending: PendingRequest | None) -> list[int] | None:
    """The prompt ids of a `generate` call, else None."""
    if pending is None or pending.metadata.call_method != GENERATE or not pending.args:
        return None
    ids = pending.args[0]
    return ids if isinstance(ids, list) else None


def rank_by_prefix(
    index: PrefixIndex[Hashable],
    candidates: Sequence[Candidate],
    loads: dict[Hashable, int],
    hashes: Sequence[BlockHash],
    margin: int,
) -> list[list[Any]]:
    """Serve's ranks of candidates: the instance `index.choose` picks among the ready ones, then the
    other ready ones (all candidates stand in for the ready ones when none is ready)."""
    ready = [c for c in candidates if c.routing_stats.get(READY_STAT, True)] or list(candidates)
    if not ready:
        return []
    ids = [c.replica_id for c in ready]
    chosen = index.choose(ids, [loads.get(i, 0) for i in ids], hashes, margin)
    first = next(c for c in ready if c.replica_id == chosen)
    rest = [c for c in ready if c is not first]
    return [[first], rest] if rest else [[first]]


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(
        self, block_size: int = 16, capacity_blocks: int = 4096, margin: int = LOAD_MARGIN, **_: Any
    ) -> None:
        self._index: PrefixIndex[Hashable] = PrefixIndex(block_size, capacity_blocks)
        self._margin = margin
        self._loads: dict[Hashable, int] = {}  # replica id -> generate calls in flight
        self._hashes: dict[str, list[BlockHash]] = {}  # internal request id -> its prompt's hashes
        self._routed: dict[str, Hashable] = {}  # internal request id -> replica id

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        prompt = prompt_of(pending_request)
        if prompt is None or pending_request is None:
            return ready_first(candidate_replicas)
        hashes = self._index.hashes(prompt)
        self._hashes[pending_request.metadata.internal_request_id] = hashes
        return rank_by_prefix(self._index, candidate_replicas, self._loads, hashes, self._margin)

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        rid = pending_request.metadata.internal_request_id
        hashes = self._hashes.pop(rid, None)
        if hashes is None:  # not a generate call
            return
        self._index.record(replica_id, hashes)
        self._loads[replica_id] = self._loads.get(replica_id, 0) + 1
        self._routed[rid] = replica_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routed = self._routed.pop(internal_request_id, None)
        self._hashes.pop(internal_request_id, None)
        if routed is not None:
            self._loads[routed] = max(0, self._loads.get(routed, 0) - 1)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        ids = [r.replica_id for r in replicas]
        self._index.retain(ids)
        self._loads = {i: n for i, n in self._loads.items() if i in set(ids)}


def prefix_router_config(engine: EngineSettings, attention_ranks: int) -> RequestRouterConfig:
    """The `ModelInstance` deployment's router: an instance caches up to its attention ranks' KV
    blocks; with prefix caching off, `routing.ReadyInstancesFirst` alone."""
    from moeserve.workers.ray_app.routing import router_config

    if not engine.prefix_caching:
        return router_config()
    fields: dict[str, Any] = {  # a dict: Ray's pydantic model is mis-typed for mypy
        "request_router_class": PrefixAffinityRouter,
        "request_router_kwargs": {
            "block_size": engine.block_size,
            "capacity_blocks": attention_ranks * (engine.num_blocks - 1),
        },
        "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
    }
    return RequestRouterConfig(**fields)
