"""bf16 weights, fp32 math on the CPU: `linear(x, w)` with x fp32 and w bf16, w never widened in memory.

Why: on x86 hosts without native bf16 (AVX2 only) torch's bf16 matmuls take scalar-widening paths,
and fp32 ones read twice the bytes; decode reads every active weight once per step, so it is bound
by those bytes. The kernel (`csrc/avx2_kernels.c`, see `avx2.py`) streams the bf16
weight, widens each value in registers (a bf16 value is the top half of an fp32 one) and computes in
fp32 with FMA: the weight values, and so the results, are those of the fp32 model up to summation
order, at half its weight bytes. Measured in bench/bench_widen_gemm.py against torch's fp32 and bf16
`linear`.

Shapes: tall products (prefill: more than `KERNEL_MAX_ROWS` rows of x) are compute-bound, where
torch's fp32 GEMM is the better kernel: they widen the weight a slab of rows at a time (bounded
memory) and call it. Without the built kernel or AVX2 + FMA, every product takes that path
(`available()` tells; `model/dtype_policy.py` then keeps fp32 weights instead).
`linear_naive` is the reference: the whole weight widened, one torch product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.workers.kernels import avx2

KERNEL_MAX_ROWS = 64
"""Products with more rows than this (prefill chunks) go to torch's fp32 GEMM a slab at a time."""
_SLAB_BYTES = 64 << 20  # fp32 weight bytes widened at once on the torch path (a huge head: in slabs)


def available() -> bool:
    """Whether the compiled kernel is built and this CPU runs it (x86 with AVX2 + FMA)."""
    return avx2.available()


def why_unavailable() -> str:
    return avx2.why_unavailable()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N] in x's dtype. A weight in x's own dtype
    is plain `F.linear`; a bf16 weight under fp32 x (on the CPU) is widened in the kernel."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    if not (weight.dtype == torch.bfloat16 and x.dtype == torch.float32 and x.device.type == "cpu"):
        raise TypeError(
            f"widen_gemm.linear: weight {weight.dtype} under x {x.dtype} on {x.device.type}; "
            "only bf16 weights under fp32 CPU activations are widened"
        )
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if available() and x2.shape[0] <= KERNEL_MAX_ROWS and weight.stride(-1) == 1:
        y = _kernel(x2, weight, bias)
    else:
        y = _widened_slabs(x2, weight, bias)
    return y.view(*shape[:-1], weight.shape[0])


def _kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"widen_gemm.linear: x has {k} columns, weight {list(weight.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,) or not bias.is_contiguous()):
        bias = bias.float().contiguous().view(n)
    y = torch.empty(m, n, dtype=torch.float32)
    assert avx2.ext is not None
    avx2.ext.linear(
        x.data_ptr(),
        x.stride(0),
        weight.data_ptr(),
        weight.stride(0),
        0 if bias is None else bias.data_ptr(),
        y.data_ptr(),
        n,
        m,
        n,
        k,
        torch.get_num_threads(),
    )
    return y


def linear_batched(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, M, K] fp32 (any strides with unit stride along K) @ weight [B, N, K]^T bf16 -> [B, M, N]
    fp32: one product per batch entry (the absorbed MLA weights, one per head), in one kernel call."""
    b, m, k = x.shape
    n = weight.shape[1]
    if weight.dtype != torch.bfloat16 or x.dtype != torch.float32 or weight.shape != (b, n, k):
        raise TypeError(
            f"widen_gemm.linear_batched: x {x.dtype} {list(x.shape)}, weight {weight.dtype} "
            f"{list(weight.shape)}; needs fp32 [B, M, K] and bf16 [B, N, K]"
        )
    if not available() or m > KERNEL_MAX_ROWS or x.device.type != "cpu":
        return torch.bmm(x, weight.to(x.dtype).transpose(1, 2))
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    y = torch.empty(b, m, n, dtype=torch.float32)
    assert avx2.ext is not None
    avx2.ext.linear_batched(
        x.data_ptr(), x.stride(0), x.stride(1), weight.data_ptr(), weight.stride(0), weight.stride(1),
        y.data_ptr(), m * n, n, b, m, n, k, torch.get_num_threads(),
    )  # fmt: skip
    return y


def _widened_slabs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch's fp32 GEMM over slabs of the weight widened in turn (never the whole weight at once)."""
    n, k = weight.shape
    rows = max(1, _SLAB_BYTES // (4 * k))
    if rows >= n:
        return F.linear(x, weight.float(), None if bias is None else bias.float())
    y = x.new_empty(x.shape[0], n)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        y[:, r0:r1] = F.linear(x, weight[r0:r1].float(), None if bias is None else bias[r0:r1].float())
    return y


def linear_naive(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: the whole weight widened to x's dtype, one torch product."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class WidenedLinear(nn.Module):
    """A linear layer holding its weight [out, in] in bf16 under fp32 activations (in place of an
    `nn.Linear` whose weights would be fp32); a bias stays fp32. Frozen: inference only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.bfloat16), False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32), False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight bf16 widened to fp32"
