"""The EPLB balancing algorithm on synthetic skewed loads.

Its map never balances worse than the contiguous map (with the same redundant slots), stays within
the stated bound of the ideal (most loaded rank <= total / ranks + heaviest replica), keeps every
expert group on one node when the ranks span nodes, and is a valid map (every expert, each at most
once per rank, slots as even as possible). Deterministic: every rank computes the same map.
"""

from __future__ import annotations

import random

import pytest

from moeserve.workers.parallel.eplb import balanced_placement, imbalance, rank_loads, slot_counts
from moeserve.workers.parallel.placement import ExpertPlacement, PlacementError

pytestmark = pytest.mark.unit


def skewed(n: int, rng: random.Random, hot: int = 3) -> list[int]:
    """A few hot experts (10-40x) over a Pareto tail."""
    load = [int(100 * rng.paretovariate(1.5)) for _ in range(n)]
    for e in rng.sample(range(n), hot):
        load[e] *= rng.randint(10, 40)
    return load


CASES = [
    (n, ranks, r)
    for n in (8, 16, 64)
    for ranks in (2, 3, 4, 8)
    if ranks <= n
    for r in (0, 1, ranks, 2 * ranks)
]


@pytest.mark.parametrize("n, ranks, redundant", CASES)
def test_balanced_map_beats_contiguous_and_stays_within_the_bound(n: int, ranks: int, redundant: int) -> None:
    for seed in range(5):
        load = skewed(n, random.Random(seed))
        p = balanced_placement(load, ranks, redundant)
        assert p.slots_per_rank == slot_counts(n + redundant, ranks)
        assert p.redundant == redundant
        contiguous = ExpertPlacement.contiguous(n, ranks).with_redundant_slots(redundant)
        assert imbalance(p, load) <= imbalance(contiguous, load) + 1e-9, seed
        hosts = p.replicas()
        heaviest = max(load[e] / len(hosts[e]) for e in range(n))
        ideal = sum(load) / ranks
        assert max(rank_loads(p, load)) <= ideal + heaviest + 1e-6, seed
        assert balanced_placement(load, ranks, redundant) == p  # deterministic


def test_redundant_slots_go_to_the_hot_experts_and_cut_the_imbalance() -> None:
    load = [1000, 900, 50, 40, 30, 20, 10, 10]  # two hot experts on rank 0 of the contiguous map
    contiguous = ExpertPlacement.contiguous(8, 2)
    assert imbalance(contiguous, load) == pytest.approx(1990 / 1030)
    alone = balanced_placement(load, 2)
    assert imbalance(alone, load) <= 1.1  # the hot two on different ranks
    replicated = balanced_placement(load, 2, redundant=2)
    hosts = replicated.replicas()
    assert len(hosts[0]) == 2 and len(hosts[1]) == 2  # both hot experts on both ranks
    assert imbalance(replicated, load) < imbalance(alone, load)
    assert imbalance(replicated, load) <= 1.02


def test_a_very_hot_expert_is_replicated_on_every_rank() -> None:
    load = [10_000] + [10] * 15
    p = balanced_placement(load, 4, redundant=4)
    assert p.replicas()[0] == [0, 1, 2, 3]  # at most once per rank: four copies, not five
    assert imbalance(p, load) < 1.05


@pytest.mark.parametrize("nodes, ranks", [(2, 4), (2, 8), (4, 8)])
def test_hierarchical_keeps_each_group_within_one_node(nodes: int, ranks: int) -> None:
    n, groups = 64, 8
    size, per_node = n // groups, ranks // nodes
    for seed in range(3):
        load = skewed(n, random.Random(seed), hot=6)
        p = balanced_placement(load, ranks, redundant=ranks, num_groups=groups, num_nodes=nodes)
        hosts = p.replicas()
        for g in range(groups):
            node_of = {r // per_node for e in range(g * size, (g + 1) * size) for r in hosts[e]}
            assert len(node_of) == 1, (seed, g, node_of)  # a group's experts and replicas share a node
        node_groups = [
            {e // size for r in range(k * per_node, (k + 1) * per_node) for e in p.ranks[r]}
            for k in range(nodes)
        ]
        assert all(len(gs) == groups // nodes for gs in node_groups)  # equal groups per node
        group_load = [sum(load[g * size : (g + 1) * size]) for g in range(groups)]
        node_load = [sum(group_load[g] for g in gs) for gs in node_groups]
        # groups onto nodes: within one group of the ideal split
        assert max(node_load) <= sum(load) / nodes + max(group_load)


def test_groups_that_do_not_divide_among_nodes_fall_back_to_global() -> None:
    load = skewed(16, random.Random(0))
    assert balanced_placement(load, 4, 4, num_groups=3, num_nodes=2) == balanced_placement(load, 4, 4)


@pytest.mark.parametrize(
    "load, ranks, redundant, message",
    [
        ([1, 2, 3], 4, 0, "4 expert ranks for 3 experts"),
        ([1, 2, 3, 4], 2, 5, "at most 4 fit"),
        ([1, -2, 3, 4], 2, 0, "loads must be >= 0"),
    ],
)
def test_impossible_requests_are_rejected(load: list[int], ranks: int, redundant: int, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        balanced_placement(load, ranks, redundant)


def test_no_load_leaves_a_valid_map() -> None:
    p = balanced_placement([0] * 8, 3, 1)
    assert imbalance(p, [0] * 8) == 1.0
    assert sorted({e for ids in p.ranks for e in ids}) == list(range(8))
