"""Fused MoE kernels (Triton) against the naive per-pair reference under Triton's interpreter,
their torch form, and the expert alignment. The same checks run on CUDA in the gpu tier."""

from __future__ import annotations

import pytest
import torch
from interpreter import Interpreter
from moe_checks import CASES, DTYPES, check_fused_moe_matches_naive

from moeserve.workers.kernels.fused_moe import fused_moe
from moeserve.workers.kernels.moe_align import align_by_expert, max_padded_rows
from moeserve.workers.model.moe import RoutedExperts

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_fused_moe_matches_naive_on_the_interpreter(interpreter: Interpreter, name: str, dtype: str) -> None:
    interpreter.run(check_fused_moe_matches_naive, name, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_torch_form_of_the_kernels_matches_naive(name: str, dtype: str) -> None:
    """The sync-free torch form that devices without the kernels use in the static decode step."""
    check_fused_moe_matches_naive(name, dtype, "cpu", impl="torch")


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
