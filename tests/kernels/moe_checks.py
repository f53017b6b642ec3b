"""Checks of the fused MoE kernels against the naive per-pair reference, by named case.

Each check builds its inputs from a case, runs `fused_moe` (or its torch form) and
`RoutedExperts.forward_naive`, and compares. The tests run them on CPU tensors in the interpreter
child (test_fused_moe.py) and on CUDA (tests/gpu/test_cuda_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.workers.kernels.fused_moe import TileConfig, fused_moe, fused_moe_torch
from moeserve.workers.model.moe import RoutedExperts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    tokens: int
    experts: int = 8
    top_k: int = 2
    dim: int = 64
    inter: int = 32
    routing: str = "random"  # random | skewed | crowded | foreign
    tiles: TileConfig | None = None


CASES = {
    "one token": Case(1, top_k=3),
    "two tokens": Case(2),
    # expert 0 takes every token, experts 5..7 none: uneven loads and experts with zero tokens
    "skewed loads, idle experts": Case(19, routing="skewed"),
    # 40 tokens on experts 2 and 3: several tiles of one expert, the last one partly padding
    "one expert over several tiles": Case(40, routing="crowded", tiles=TileConfig(16, 16, 16)),
    "dims not multiples of the tiles": Case(11, dim=48, inter=40, tiles=TileConfig(16, 32, 32)),
    "large batch tiles": Case(150, experts=16, top_k=6, dim=32, inter=16),
    # an expert rank: ids == E are hosted elsewhere and contribute nothing here
    "foreign pairs (expert rank)": Case(13, routing="foreign"),
    "foreign pairs, one token": Case(1, top_k=3, routing="foreign"),
}


def routing(case: Case, gen: torch.Generator) -> torch.Tensor:
    t, e, k = case.tokens, case.experts, case.top_k
    if case.routing == "skewed":
        rest = torch.stack([torch.randperm(4, generator=gen)[: k - 1] + 1 for _ in range(t)])
        return torch.cat([torch.zeros(t, 1, dtype=torch.long), rest], dim=1)
    if case.routing == "crowded":
        return torch.tensor([[2, 3]] * t)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    if case.routing == "foreign":  # about half the pairs go to other ranks (several per token)
        ids = torch.where(torch.rand(t, k, generator=gen) < 0.5, e, ids)
    return ids


def check_fused_moe_matches_naive(name: str, dtype_name: str, device: str, impl: str = "triton") -> None:
    case, dtype = CASES[name], DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(len(name))
    experts = RoutedExperts(case.dim, case.inter, list(range(case.experts)))
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    experts = experts.to(dtype)
    x = torch.randn(case.tokens, case.dim, generator=gen).to(dtype)
    ids = routing(case, gen)
    weights = torch.rand(case.tokens, case.top_k, generator=gen) + 0.1
    hosted = ids < case.experts
    expected = experts.forward_naive(x, torch.where(hosted, ids, 0), torch.where(hosted, weights, 0.0))
    inputs = [t.to(device) for t in (x, experts.w13.detach(), experts.w2.detach(), ids, weights)]
    if impl == "triton":
        got = fused_moe(*inputs, foreign=case.routing == "foreign", config=case.tiles).cpu()
    else:
        got = fused_moe_torch(*inputs, block_m=case.tiles.block_m if case.tiles else 16).cpu()
    assert got.shape == expected.shape and got.dtype == dtype, (got.shape, got.dtype)
    scale = expected.float().abs().max().item()
    tol = 1e-5 * scale if dtype == torch.float32 else 2**-6 * scale  # bf16: about two ulps of the max
    err = (got.float() - expected.float()).abs().max().item()
    assert err <= tol, (
        f"{name} {dtype_name} on {device}: max error {err:.3g} > {tol:.3g} (max |y| {scale:.3g})"
    )
