"""Expert placement: every expert hosted exactly once, groups aligned to ranks, bad maps rejected."""

from __future__ import annotations

import re

import pytest
import torch
from builders import tiny_config

from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.moe import Router
from moeserve.workers.parallel.placement import ExpertPlacement, PlacementError, parse_map

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
