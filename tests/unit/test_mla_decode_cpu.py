"""The absorbed MLA decode read in place from the paged fp32 cache (`kernels/mla_decode_cpu.py`)
against its torch form, `paged_mla_decode_torch` (gathered, padded, two bmm)."""

from __future__ import annotations

import pytest
import torch

from moeserve.workers.kernels import avx2
from moeserve.workers.kernels.mla_decode import paged_mla_decode_torch
from moeserve.workers.kernels.mla_decode_cpu import paged_mla_decode_cpu, supports

pytestmark = pytest.mark.unit


def _case(b: int, heads: int, c: int, r: int, block: int, lens: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    nb = max(-(-n // block) for n in lens) + 1  # one spare entry past the longest: padding
    blocks = b * nb + 3
    cache = torch.randn(blocks, block, c + r, generator=gen)
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:nb] for _ in range(b)])
    q = torch.randn(b, heads, c + r, generator=gen)
    return q, cache, tables, torch.tensor(lens)


@pytest.fixture(autouse=True)
def _kernel_here() -> None:
    assert avx2.available(), avx2.why_unavailable() + ": run `pip install -e .` with a C compiler"


@pytest.mark.parametrize(
    "b,heads,c,r,block,lens",
    [
        (1, 16, 512, 64, 64, [2048]),  # the bench model: split between threads, merged
        (1, 16, 512, 64, 64, [1]),
        (2, 16, 512, 64, 16, [100, 1]),
        (3, 5, 32, 16, 4, [1, 7, 30]),  # head and row tails
        (4, 1, 8, 3, 1, [5, 1, 2, 9]),  # block size 1, odd rope width
        (2, 17, 40, 0, 8, [64, 33]),  # no rope columns; C not a multiple of 32
        (16, 16, 512, 64, 64, [160] * 16),
        (1, 2, 16, 8, 128, [300]),  # a block longer than the kernel's run of 32 rows
    ],
)
def test_matches_the_gathered_torch_form(b, heads, c, r, block, lens) -> None:
    q, cache, tables, lens_t = _case(b, heads, c, r, block, lens)
    want = paged_mla_decode_torch(q, cache, tables, lens_t, 0.07, c)
    got = paged_mla_decode_cpu(q, cache, tables, lens_t, 0.07, c)
    assert got.shape == (b, heads, c)
    assert torch.allclose(got, want, atol=2e-6, rtol=1e-5)


def test_large_scores_do_not_overflow_the_softmax() -> None:
    q, cache, tables, lens = _case(1, 4, 32, 8, 16, [700], seed=1)
    q = q * 300.0  # scores in the hundreds: e^x overflows unless the running max is taken out
    want = paged_mla_decode_torch(q, cache, tables, lens, 0.1, 32)
    got = paged_mla_decode_cpu(q, cache, tables, lens, 0.1, 32)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_it_takes_fp32_only_and_refuses_what_does_not_fit() -> None:
    q, cache, tables, lens = _case(2, 4, 32, 8, 4, [5, 9])
    assert supports(q, cache, 32)
    assert not supports(q.bfloat16(), cache.bfloat16(), 32)
    assert not supports(q, cache, 20)  # C % 8
    with pytest.raises(ValueError, match="needs fp32 CPU tensors"):
        paged_mla_decode_cpu(q.bfloat16(), cache.bfloat16(), tables, lens, 0.1, 32)
    with pytest.raises(ValueError, match="beyond the block tables"):
        paged_mla_decode_cpu(q, cache, tables, torch.tensor([5, tables.shape[1] * 4 + 1]), 0.1, 32)
    with pytest.raises(ValueError, match="do not fit"):
        paged_mla_decode_cpu(q, cache[..., :-1], tables, lens, 0.1, 32)
