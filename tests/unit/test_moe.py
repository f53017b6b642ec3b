"""Routed experts: grouped matmuls agree with the naive per-pair reference; routing methods."""

from __future__ import annotations

import pytest
import torch
from builders import tiny_config

from moeserve.workers.model.moe import LocalRoutedExecutor, RoutedExperts, Router, combine, sort_by_expert

pytestmark = pytest.mark.unit


def experts(n: int = 8, dim: int = 16, inter: int = 12) -> RoutedExperts:
    torch.manual_seed(0)
    e = RoutedExperts(dim, inter, list(range(n)))
    with torch.no_grad():
        for p in e.parameters():
            p.normal_(0, 0.2)
    return e


def test_grouped_matches_naive() -> None:
    e = experts()
    x = torch.randn(37, 16)
    ids = torch.stack([torch.randperm(8)[:3] for _ in range(37)])
    weights = torch.rand(37, 3)
    grouped = LocalRoutedExecutor({0: e})(0, x, ids, weights)
    assert torch.allclose(grouped, e.forward_naive(x, ids, weights), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, dim, k", [(8, 16, 3), (16, 2048, 6), (16, 512, 8)])
def test_single_token_path_equals_grouped_path(dtype: torch.dtype, n: int, dim: int, k: int) -> None:
    """Decode at batch 1 takes `forward_token`; it must give the grouped path's result exactly
    (its sum over the K outputs rounds as the grouped path's index_add_ does, at model widths too)."""
    e = experts(n, dim, 24).to(dtype)
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(1, dim, generator=gen).to(dtype)
        ids = torch.randperm(n, generator=gen)[:k][None]
        weights = torch.rand(1, k, generator=gen) * 4
        order, token, counts = sort_by_expert(ids, n)
        grouped = combine(e.forward_sorted(x[token], counts), order, token, weights, 1)
        single = LocalRoutedExecutor({0: e})(0, x, ids, weights)
        assert torch.equal(single, grouped)
        naive = e.forward_naive(x, ids, weights).float()
        error = (single.float() - naive).norm() / naive.norm()
        assert error < (1e-6 if dtype == torch.float32 else 1e-2), error


def test_experts_without_tokens_and_empty_batch() -> None:
    e = experts()
    x = torch.randn(2, 16)
    ids = torch.tensor([[1, 1], [1, 1]])
    out = LocalRoutedExecutor({0: e})(0, x, ids, torch.ones(2, 2))
    assert torch.allclose(out, e.forward_naive(x, ids, torch.ones(2, 2)), atol=1e-5)
    empty = LocalRoutedExecutor({0: e})(0, x[:0], ids[:0], torch.ones(0, 2))
    assert empty.shape == (0, 16)


def test_group_limited_routing_stays_within_topk_groups() -> None:
    cfg = tiny_config(topk_method="group_limited_greedy", n_group=4, topk_group=1)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight)
    _, ids = router(torch.randn(64, 16))
    assert ((ids // 2).min(dim=1).values == (ids // 2).max(dim=1).values).all()


def test_noaux_tc_bias_selects_but_does_not_weigh() -> None:
    cfg = tiny_config(
        model_type="deepseek_v3", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0
    )
    router = Router(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(4, 16)
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[7] = 100.0  # always chosen
    weights, ids = router(x)
    assert (ids == 7).any(dim=1).all()
    expected = torch.sigmoid(x @ router.weight.t()).gather(1, ids)
    assert torch.allclose(weights, expected)
