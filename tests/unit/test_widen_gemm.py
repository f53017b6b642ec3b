"""The CPU kernel for bf16 weights under fp32 math (`kernels/widen_gemm.py`) against its reference."""

from __future__ import annotations

import platform

import pytest
import torch

from moeserve.workers.kernels import widen_gemm
from moeserve.workers.kernels.widen_gemm import KERNEL_MAX_ROWS, WidenedLinear, linear, linear_naive

pytestmark = pytest.mark.unit


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 sums in another order: within a few ulps of the row's magnitude."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().amax().clamp(min=1.0)
    assert ((got - want).abs().amax() / scale).item() <= 2e-6


def test_the_kernel_is_built_and_runs_on_x86_hosts() -> None:
    """Elsewhere there is no kernel, and every product below takes the torch path."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert not widen_gemm.available()
        return
    assert widen_gemm.available(), widen_gemm.why_unavailable() + ": run `pip install -e .` with a C compiler"


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 16, 33, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, 130])
@pytest.mark.parametrize("n,k", [(1, 8), (5, 13), (9, 24), (67, 130), (256, 2048)])
def test_products_match_the_widened_reference(m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen).bfloat16()
    _close(linear(x, w), linear_naive(x, w))


def test_bias_strided_rows_and_leading_dims() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(37, 40, generator=gen).bfloat16()
    bias = torch.randn(37, generator=gen)
    wide = torch.randn(6, 100, generator=gen)
    x = wide[:, 10:50]  # rows 100 apart: the kernel takes the row stride
    _close(linear(x, w, bias), linear_naive(x, w, bias))
    x3 = torch.randn(2, 3, 40, generator=gen)
    assert linear(x3, w).shape == (2, 3, 37)
    _close(linear(x3, w).view(6, 37), linear_naive(x3.view(6, 40), w))
    cols = torch.randn(40, 6, generator=gen).t()  # unit stride along rows, not columns
    _close(linear(cols, w), linear_naive(cols, w))
    half_bias = bias.bfloat16()
    _close(linear(x, w, half_bias), linear_naive(x, w, half_bias.float()))


def test_a_rows_result_does_not_depend_on_the_batch_it_is_in() -> None:
    """Each output is one thread's sum in one order, whatever M and the tile it falls in, so a token
    decoded alone and in a batch gets the same bits (up to the kernel's row limit)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(KERNEL_MAX_ROWS, 300, generator=gen)
    w = torch.randn(90, 300, generator=gen).bfloat16()
    together = linear(x, w)
    for i in (0, 1, 2, 5, KERNEL_MAX_ROWS - 1):
        assert torch.equal(linear(x[i : i + 1], w)[0], together[i])
    assert torch.equal(linear(x[:7], w), together[:7])


def test_the_torch_path_widens_a_slab_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(widen_gemm, "_SLAB_BYTES", 4 * 64 * 10)  # 10 rows of 64 columns per slab
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(KERNEL_MAX_ROWS + 3, 64, generator=gen)
    w = torch.randn(35, 64, generator=gen).bfloat16()
    bias = torch.randn(35, generator=gen)
    _close(linear(x, w, bias), linear_naive(x, w, bias))


def test_same_dtypes_are_plain_products_and_other_mixes_are_refused() -> None:
    x = torch.randn(2, 8)
    w = torch.randn(3, 8)
    assert torch.equal(linear(x, w), torch.nn.functional.linear(x, w))
    with pytest.raises(TypeError, match="only bf16 weights under fp32 CPU activations"):
        linear(x.bfloat16(), w)
    with pytest.raises(TypeError, match="only bf16 weights"):
        linear(x, w.half())
    with pytest.raises(ValueError, match="x has 8 columns"):
        linear(x, torch.randn(3, 9).bfloat16())


def test_widened_linear_is_an_nn_linear_with_a_bf16_weight() -> None:
    gen = torch.Generator().manual_seed(6)
    layer = WidenedLinear(12, 5, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 12, generator=gen))
        layer.bias.copy_(torch.randn(5, generator=gen))
    ref = torch.nn.Linear(12, 5)
    with torch.no_grad():
        ref.weight.copy_(layer.weight.float())
        ref.bias.copy_(layer.bias)
    x = torch.randn(3, 12, generator=gen)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    _close(layer(x), ref(x).detach())


@pytest.mark.parametrize("b,m,n,k", [(16, 1, 512, 128), (16, 3, 128, 512), (3, 5, 9, 13), (1, 1, 4, 8)])
def test_batched_products_match_bmm_on_strided_inputs(b: int, m: int, n: int, k: int) -> None:
    """One product per head, x strided as q_nope.transpose(0, 1) is in the absorbed MLA decode."""
    gen = torch.Generator().manual_seed(b * m + n * k)
    x = torch.randn(m, b, k, generator=gen).transpose(0, 1)
    w = torch.randn(b, n, k, generator=gen).bfloat16()
    want = torch.bmm(x, w.float().transpose(1, 2))
    got = widen_gemm.linear_batched(x, w)
    assert got.shape == (b, m, n)
    assert ((got - want).abs().amax() / want.abs().amax().clamp(min=1.0)).item() <= 2e-6
    with pytest.raises(TypeError, match="needs fp32"):
        widen_gemm.linear_batched(x, w.float())
