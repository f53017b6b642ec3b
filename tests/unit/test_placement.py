"""Expert placement: every expert hosted (once, or on several ranks with redundant slots), groups
aligned to ranks, replicas chosen by token index, bad maps rejected."""

from __future__ import annotations

import re

import pytest
import torch
from builders import tiny_config

from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.moe import Router
from moeserve.workers.parallel.placement import ExpertPlacement, PlacementError, Routes, parse_map

pytestmark = pytest.mark.unit


def config(**overrides: object) -> ModelConfig:
    return tiny_config(**{"n_routed_experts": 16, "num_experts_per_tok": 4, **overrides})


def grouped(n_group: int = 4, topk_group: int = 2) -> ModelConfig:
    return config(topk_method="group_limited_greedy", n_group=n_group, topk_group=topk_group)


def test_contiguous_default_is_balanced_and_covers_every_expert_once() -> None:
    p = ExpertPlacement.for_model(config(), 3)
    assert p.ranks == (tuple(range(0, 5)), tuple(range(5, 10)), tuple(range(10, 16)))
    assert sorted(e for ids in p.ranks for e in ids) == list(range(16))
    assert p.rank_of_expert().tolist() == [0] * 5 + [1] * 5 + [2] * 6
    assert p.local_index().tolist()[:6] == [0, 1, 2, 3, 4, 0]


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8, 16])
def test_group_limited_routing_reaches_at_most_topk_group_ranks(ranks: int) -> None:
    cfg = grouped()
    p = ExpertPlacement.for_model(cfg, ranks)
    owner = p.rank_of_expert().view(cfg.n_group, cfg.experts_per_group)  # [G, E/G]
    per_group = [len(set(row.tolist())) for row in owner]
    assert all(n == max(1, ranks // cfg.n_group) for n in per_group)  # no rank mixes groups
    router = Router(cfg)
    torch.manual_seed(0)
    torch.nn.init.normal_(router.weight)
    _, ids = router(torch.randn(256, 16))
    reached = max(len(set(row.tolist())) for row in p.rank_of_expert()[ids])
    bound = p.max_ranks_per_token(cfg)
    assert reached <= bound
    ranks_per_group = max(1, ranks // cfg.n_group)
    assert bound == min(cfg.num_experts_per_tok, cfg.topk_group * ranks_per_group, ranks)


def test_three_ranks_over_four_groups_keep_groups_whole() -> None:
    p = ExpertPlacement.for_model(grouped(), 3)  # groups of 4 experts: 1 + 1 + 2 groups
    assert p.ranks == (tuple(range(0, 4)), tuple(range(4, 8)), tuple(range(8, 16)))
    assert ExpertPlacement.contiguous(16, 3).ranks != p.ranks  # plain contiguous would split groups


def test_explicit_map_is_accepted() -> None:
    explicit = [[15, 0, 1], list(range(2, 15))]
    p = ExpertPlacement.for_model(config(), 2, explicit)
    assert p.ranks == ((0, 1, 15), tuple(range(2, 15)))
    assert p.rank_of_expert()[15] == 0 and p.local_index()[15] == 2


@pytest.mark.parametrize(
    "ranks, explicit, message",
    [
        (2, [[0, 1, 2], list(range(2, 16))], "expert 2 is hosted twice"),
        (2, [[0, 1], list(range(2, 15))], "expert(s) [15] are hosted by no rank"),
        (2, [[0, 16], list(range(1, 16))], "expert 16 on rank 0 is out of range"),
        (2, [[], list(range(16))], "expert rank(s) [0] host no expert"),
        (3, [list(range(8)), list(range(8, 16))], "lists 2 expert ranks, expected 3"),
        (17, None, "17 expert ranks for 16 experts"),
        (0, None, "at least one expert rank"),
    ],
)
def test_invalid_maps_are_rejected_with_a_message(
    ranks: int, explicit: list[list[int]] | None, message: str
) -> None:
    with pytest.raises(PlacementError, match=re.escape(message)) as info:
        ExpertPlacement.for_model(config(), ranks, explicit)
    assert isinstance(info.value, ValueError)


def test_ranks_that_cannot_align_with_groups_are_rejected() -> None:
    with pytest.raises(PlacementError, match="cannot align with 4 expert groups"):
        ExpertPlacement.for_model(grouped(), 6)


def test_parse_map() -> None:
    assert parse_map("0-3,8; 4-7") == [[0, 1, 2, 3, 8], [4, 5, 6, 7]]
    with pytest.raises(PlacementError, match="'x'"):
        parse_map("0-3;x")


def test_redundant_slots_by_default_spread_evenly_and_host_every_expert() -> None:
    p = ExpertPlacement.for_model(config(), 3, redundant=4)  # 20 slots over 3 ranks
    assert p.slots_per_rank == [7, 7, 6]
    assert p.ranks == ((0, 1, 2, 3, 4, 5, 6), (5, 6, 7, 8, 9, 10, 11), (10, 11, 12, 13, 14, 15))
    hosts = p.replicas()
    assert all(hosts[e] for e in range(16))
    assert sum(len(h) for h in hosts) == 20
    assert all(len(set(ids)) == len(ids) for ids in p.ranks)  # an expert at most once per rank
    assert "rank 1: 7 slots [5*,6*,7,8,9,10*,11*]" in p.describe()


def test_routes_pick_one_replica_by_token_index() -> None:
    p = ExpertPlacement.from_lists(8, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]], redundant=2)
    routes = Routes(p)
    ids = torch.tensor([[0, 5], [0, 1], [0, 4], [4, 7]])  # [T, K]
    dest, local = routes.route(ids)
    assert dest.tolist() == [[0, 1], [1, 0], [0, 0], [1, 1]]  # token t uses replica t % copies
    for t in range(4):  # the local index names that expert on that rank
        for k in range(2):
            assert p.ranks[int(dest[t, k])][int(local[t, k])] == int(ids[t, k])
    again, _ = routes.route(ids)
    assert torch.equal(again, dest)  # deterministic
    shifted, _ = routes.route(ids, salt=1)  # another attention rank starts on the other replica
    assert shifted[0, 0] == 1
    many = torch.zeros(1000, 1, dtype=torch.long)  # expert 0 only: half on each replica
    assert torch.bincount(routes.route(many)[0].flatten()).tolist() == [500, 500]


def test_without_redundancy_routes_are_the_first_host() -> None:
    p = ExpertPlacement.for_model(config(), 3)
    dest, local = Routes(p).route(torch.arange(16)[:, None])
    assert dest.flatten().tolist() == p.rank_of_expert().tolist()
    assert local.flatten().tolist() == p.local_index().tolist()


@pytest.mark.parametrize(
    "ranks, redundant, explicit, message",
    [
        (2, 17, None, "at most 16 fit"),
        (1, 1, None, "at most 0 fit"),
        (2, -1, None, "must be >= 0"),
        (
            2,
            1,
            [list(range(9)), list(range(9, 16))],
            "the map has 16 expert slots; 16 experts with 1 redundant slots need 17",
        ),
        (2, 2, [[0, 1, 1], list(range(2, 16))], "expert(s) [1] are hosted twice on rank 0"),
        (2, 2, [[0, 1, 2], [0, 1, 2]], "are hosted by no rank"),
    ],
)
def test_invalid_redundancy_is_rejected(
    ranks: int, redundant: int, explicit: list[list[int]] | None, message: str
) -> None:
    with pytest.raises(PlacementError, match=re.escape(message)):
        ExpertPlacement.for_model(config(), ranks, explicit, redundant)


def test_group_bound_counts_every_replica() -> None:
    cfg = grouped()  # 4 groups of 4 experts, 2 groups per token
    p = ExpertPlacement.for_model(cfg, 4, redundant=1)  # one replica of group 1's expert on rank 0
    assert p.max_ranks_per_token(cfg) == 3
    router = Router(cfg)
    torch.manual_seed(0)
    torch.nn.init.normal_(router.weight)
    _, ids = router(torch.randn(256, 16))
    dest, _ = Routes(p).route(ids)
    assert max(len(set(row.tolist())) for row in dest) <= p.max_ranks_per_token(cfg)
