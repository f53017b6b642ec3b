"""The Ray Serve model-instance router's cache-aware choice: prompts go to the instance holding their
prefix unless it is overloaded; rebuilding instances are skipped; only `generate` calls count."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import pytest
from ray.serve._private.common import RequestMetadata
from ray.serve.request_router import PendingRequest

from moeserve.engine_settings import EngineSettings
from moeserve.workers.engine.prefix_routing import PrefixIndex
from moeserve.workers.ray_app.prefix_router import (
    PrefixAffinityRouter,
    prefix_router_config,
    prompt_of,
    rank_by_prefix,
)
from moeserve.workers.ray_app.routing import READY_STAT, ReadyInstancesFirst

pytestmark = pytest.mark.unit
SYSTEM = [[7] * 32, [9] * 32]  # two system prompts of 2 blocks of 16


@dataclass(eq=False)
class Instance:  # what the router reads of Serve's RunningReplica
    replica_id: str
    routing_stats: dict[str, Any] = field(default_factory=dict)


def names(ranks: list[list[Any]]) -> list[list[str]]:
    return [[c.replica_id for c in rank] for rank in ranks]


def test_each_system_prompt_sticks_to_one_instance_unless_it_is_overloaded() -> None:
    index: PrefixIndex[Hashable] = PrefixIndex(16, 1000)
    a, b = Instance("a"), Instance("b")
    loads = {"a": 0, "b": 0}
    placed: dict[int, set[str]] = {0: set(), 1: set()}
    for i in range(12):  # interleaved, each request recorded where it went
        hashes = index.hashes(SYSTEM[i % 2] + [i, i + 1])
        first = rank_by_prefix(index, [a, b], loads, hashes, margin=2)[0][0]
        index.record(first.replica_id, hashes)
        placed[i % 2].add(first.replica_id)
    assert placed == {0: {"a"}, 1: {"b"}}  # the second prompt found the emptier instance
    hashes = index.hashes(SYSTEM[0] + [99])
    assert names(rank_by_prefix(index, [a, b], {"a": 2, "b": 0}, hashes, margin=2)) == [["a"], ["b"]]
    assert names(rank_by_prefix(index, [a, b], {"a": 3, "b": 0}, hashes, margin=2)) == [["b"], ["a"]]


def test_rebuilding_instances_are_skipped_unless_all_are() -> None:
    index: PrefixIndex[Hashable] = PrefixIndex(16, 1000)
    hashes = index.hashes(SYSTEM[0])
    index.record("a", hashes)
    a, b = Instance("a", {READY_STAT: False}), Instance("b", {READY_STAT: True})
    assert names(rank_by_prefix(index, [a, b], {}, hashes, margin=8)) == [["b"]]
    a.routing_stats[READY_STAT] = b.routing_stats[READY_STAT] = False
    assert names(rank_by_prefix(index, [a, b], {}, hashes, margin=8)) == [["a"], ["b"]]
    assert rank_by_prefix(index, [], {}, hashes, margin=8) == []


def pending(method: str, *args: Any) -> PendingRequest:
    return PendingRequest(
        list(args), {}, RequestMetadata(request_id="r", internal_request_id="i", call_method=method)
    )


def test_only_generate_calls_carry_a_prompt() -> None:
    async def check() -> None:  # a PendingRequest makes a future: it needs a running loop
        assert prompt_of(pending("generate", [1, 2, 3], None, "id", None)) == [1, 2, 3]
        assert prompt_of(pending("stats")) is None
        assert prompt_of(None) is None

    asyncio.run(check())


def test_the_router_config_follows_the_engine_settings() -> None:
    on = prefix_router_config(EngineSettings(block_size=8, kv_cache_tokens=800), attention_ranks=2)
    assert on.get_request_router_class() is PrefixAffinityRouter
    assert on.request_router_kwargs == {"block_size": 8, "capacity_blocks": 200}
    off = prefix_router_config(EngineSettings(prefix_caching=False), attention_ranks=2)
    assert off.get_request_router_class() is ReadyInstancesFirst
