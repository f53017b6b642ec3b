"""Fused MoE kernels (Triton) against the naive per-pair reference, on the interpreter and on CUDA.

Each check builds its inputs from a named case, runs `fused_moe` and `RoutedExperts.forward_naive`
and compares; CPU checks run in the interpreter child (see interpreter.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from interpreter import Interpreter

from moeserve.workers.kernels.fused_moe import TileConfig, fused_moe, fused_moe_torch
from moeserve.workers.kernels.moe_align import align_by_expert, max_padded_rows
from moeserve.workers.moe import RoutedExperts

pytestmark = pytest.mark.unit

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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_fused_moe_matches_naive_on_the_interpreter(interpreter: Interpreter, name: str, dtype: str) -> None:
    interpreter.run(check_fused_moe_matches_naive, name, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_torch_form_of_the_kernels_matches_naive(name: str, dtype: str) -> None:
    """The sync-free torch form that devices without the kernels use in the static decode step."""
    check_fused_moe_matches_naive(name, dtype, "cpu", impl="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_fused_moe_matches_naive_on_cuda(name: str, dtype: str) -> None:
    check_fused_moe_matches_naive(name, dtype, "cuda")


@pytest.mark.parametrize("tokens,block_m", [(1, 16), (2, 16), (19, 16), (40, 64), (150, 32)])
def test_alignment_tiles_each_pair_once_by_expert(tokens: int, block_m: int) -> None:
    """Every hosted pair sits in exactly one row, in a tile of its own expert; each expert's run is
    padded to whole tiles; foreign pairs (id E) are nowhere; the shapes depend on (T, K, E) only."""
    gen = torch.Generator().manual_seed(tokens)
    e, k = 8, 3
    ids = torch.stack([torch.randperm(e + 1, generator=gen)[:k] for _ in range(tokens)])
    ids[0] = torch.tensor([e, 1, 2])  # at least one foreign pair
    aligned = align_by_expert(ids, e, block_m)
    flat, pairs = ids.flatten(), tokens * k
    capacity = pairs * block_m if tokens == 1 else max_padded_rows(pairs, e, block_m)
    assert aligned.sorted_pairs.shape == (capacity,)
    assert aligned.tile_experts.shape == (capacity // block_m,)
    rows = aligned.sorted_pairs.long()
    used = int(aligned.num_padded)
    assert (rows[used:] == pairs).all()
    real = rows[rows < pairs]
    tile_of_row = torch.arange(capacity) // block_m
    expert_of_row = aligned.tile_experts.long()[tile_of_row]
    assert torch.equal((expert_of_row[rows < pairs]), flat[real])
    hosted = real[flat[real] < e]
    assert sorted(hosted.tolist()) == [p for p in range(pairs) if flat[p] < e]
    if tokens > 1:  # grouped: foreign pairs are left out, hosted experts' runs are whole tiles
        assert len(real) == len(hosted)
        assert used == sum(-(-int((flat == x).sum()) // block_m) * block_m for x in range(e))


def test_no_tokens_gives_an_empty_result_without_a_kernel() -> None:
    experts = RoutedExperts(16, 8, list(range(4)))
    out = fused_moe(
        torch.zeros(0, 16), experts.w13.detach(), experts.w2.detach(), torch.zeros(0, 2, dtype=torch.long),
        torch.zeros(0, 2),
    )  # fmt: skip
    assert out.shape == (0, 16)
