"""The model-instance router skips instances that report they are rebuilding, unless all are."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from moeserve.workers.ray_app.routing import READY_STAT, ready_first

pytestmark = pytest.mark.unit


@dataclass(eq=False)
class Instance:  # what the router reads of Serve's RunningReplica
    name: str
    routing_stats: dict[str, Any] = field(default_factory=dict)


def chosen(candidates: list[Instance], group_size: int, rounds: int = 200) -> set[str]:
    """Every instance any of `rounds` routing rounds offered; each round offers one group."""
    seen = set()
    for _ in range(rounds):
        (group,) = ready_first(candidates)  # type: ignore[arg-type]
        assert len(group) == group_size and len({id(r) for r in group}) == group_size
        seen |= {r.name for r in group}
    return seen


def test_only_ready_instances_are_offered_while_any_is_ready() -> None:
    a, b, c = Instance("a", {READY_STAT: True}), Instance("b", {READY_STAT: False}), Instance("c", {})
    assert chosen([a, b, c], group_size=2) == {"a", "c"}  # c has not reported yet: taken as ready
    assert chosen([a, b], group_size=1) == {"a"}


def test_all_rebuilding_falls_back_to_every_instance() -> None:
    a, b = Instance("a", {READY_STAT: False}), Instance("b", {READY_STAT: False})
    assert chosen([a, b], group_size=2) == {"a", "b"}
    assert ready_first([]) == []


def test_two_of_many_ready_are_sampled_evenly() -> None:
    instances = [Instance(str(i), {READY_STAT: True}) for i in range(5)]
    assert chosen(instances, group_size=2) == {str(i) for i in range(5)}
