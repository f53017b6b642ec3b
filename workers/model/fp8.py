"""Block-scaled FP8 weights as DeepSeek-V3 publishes them: `float8_e4m3fn` values and one fp32
`scale_inv` per 128x128 block, `weight ~= fp8 * scale_inv` blockwise. A dimension that is not a
multiple of the block has a partial last block (scale shape ceil(N/128) x ceil(K/128)).

What this module is: the weight type (`BlockFp8`), the naive reference `dequantize`, `quantize`
(DeepSeek's recipe: scale_inv = amax(block) / 448), the CPU product that dequantizes one group of
block rows at a time inside the matmul (`linear`), and `BlockFp8Linear`, a module holding such a
weight. Products are weight-only: activations stay in the model's dtype, so a product equals that of
the dequantized weight up to the dtype's rounding (DeepSeek's own kernel also quantizes activations
per 1x128 group, "activation_scheme: dynamic", which moves the result further from it).
What it is not: the checkpoint reader (`loader.py`), the checkpoint writer (`quantize_fp8.py`) or the
CUDA kernel (`kernels/fp8_gemm.py`, which `linear` calls for CUDA tensors).
Legend: T tokens, N output rows, K input columns, bn x bk the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.workers.kernels.fp8_gemm import dequantize_blocks, fp8_block_linear

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)
# CPU `linear` converts about this many weight bytes (in the compute dtype) per step: a slab that
# stays in the core's L2 cache between its conversion and its product
_SLAB_BYTES = 1 << 20


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(rows: int, cols: int, block: tuple[int, int], parts: int = 1) -> tuple[int, int]:
    """Scale grid of a [rows, cols] weight made of `parts` equal row parts, each on its own grid."""
    return parts * cdiv(rows // parts, block[0]), cdiv(cols, block[1])


@dataclass(frozen=True)
class BlockFp8:
    """weight [..., N, K] float8_e4m3fn; scale_inv [..., S, ceil(K/bk)] fp32.

    `parts` > 1: the rows are that many equal parts stacked (gate ; up), each on the block grid of
    its own checkpoint tensor, so S = parts * ceil(N/parts/bn) (= ceil(N/bn) when N/parts is a
    multiple of bn). Leading dims (stacked experts) are carried through.
    """

    weight: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int] = DEFAULT_BLOCK
    parts: int = 1

    def __post_init__(self) -> None:
        n, k = self.weight.shape[-2:]
        want = (*self.weight.shape[:-2], *scale_shape(n, k, self.block, self.parts))
        if self.weight.dtype != FP8 or tuple(self.scale_inv.shape) != want:
            raise ValueError(
                f"BlockFp8: weight {self.weight.dtype} {list(self.weight.shape)} needs float8_e4m3fn and "
                f"scale_inv {list(want)}, got {list(self.scale_inv.shape)}"
            )

    def __getitem__(self, i: int) -> BlockFp8:
        """Expert i of stacked weights."""
        return BlockFp8(self.weight[i], self.scale_inv[i], self.block, self.parts)


def dequantize(w: BlockFp8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The naive reference: weight.float() * scale_inv repeated over its block (cropped) ->
    [..., N, K] in `dtype`."""
    return dequantize_blocks(w.weight, w.scale_inv, w.block, w.parts, dtype)


def quantize(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> BlockFp8:
    """One [N, K] weight to fp8 blocks: scale_inv = amax(|block|) / 448 (zero-padded partial blocks,
    as DeepSeek quantizes), values rounded to nearest float8_e4m3fn."""
    if weight.dim() != 2:
        raise ValueError(f"quantize takes a 2-D weight, got shape {list(weight.shape)}")
    bn, bk = block
    n, k = weight.shape
    sn, sk = cdiv(n, bn), cdiv(k, bk)
    padded = F.pad(weight.float(), (0, sk * bk - k, 0, sn * bn - n))  # [sn*bn, sk*bk]
    blocks = padded.view(sn, bn, sk, bk)
    amax = blocks.abs().amax(dim=(1, 3))  # [sn, sk]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero block: 1
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return BlockFp8(q.view(sn * bn, sk * bk)[:n, :k].contiguous(), scale_inv.contiguous(), block)


def linear(x: torch.Tensor, w: BlockFp8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ dequantize(w)^T (+ bias) -> [T, N] in x's dtype.

    CUDA tensors go to the Triton block-fp8 GEMM. On the CPU the weight is read a slab of whole
    block rows at a time (never the whole matrix in the compute dtype): the fp8 bits become the
    compute dtype by integer shifts (`_fp8_bits_as`; torch's own fp8 conversion is scalar on the
    CPU), and the block scales multiply x, not the weight: for block row b,
    y_b = (x * scale_inv[b] per column block) @ W_b^T, a batched matmul over the slab's block rows.
    """
    if x.is_cuda:
        y = fp8_block_linear(x, w.weight, w.scale_inv, w.block, w.parts)
        return y if bias is None else y + bias
    bn, bk = w.block
    n, k = w.weight.shape
    t = x.shape[0]
    rows_per_part, blocks_per_part = n // w.parts, cdiv(n // w.parts, bn)
    slab_rows = max(bn, _SLAB_BYTES // (k * x.element_size()) // bn * bn)
    out = x.new_empty(t, n)
    for part in range(w.parts):
        for r0 in range(0, rows_per_part, slab_rows):
            r1 = min(r0 + slab_rows, rows_per_part)
            b0 = part * blocks_per_part + r0 // bn
            weights, factor = _fp8_bits_as(
                w.weight[part * rows_per_part + r0 : part * rows_per_part + r1], x.dtype
            )
            scales = w.scale_inv[b0 : b0 + cdiv(r1 - r0, bn)] * factor  # [G, ceil(K/bk)]
            xs = x[None] * scales.repeat_interleave(bk, dim=-1)[:, None, :k].to(x.dtype)  # [G, T, K]
            full = (r1 - r0) // bn
            y = out[:, part * rows_per_part + r0 : part * rows_per_part + r1]
            if full:  # [G, T, K] @ [G, K, bn] -> [G, T, bn] -> [T, G*bn]
                blocks = weights[: full * bn].view(full, bn, k).transpose(1, 2)
                y[:, : full * bn] = torch.bmm(xs[:full], blocks).transpose(0, 1).reshape(t, full * bn)
            if full * bn < r1 - r0:  # the partial last block row of the part
                y[:, full * bn :] = F.linear(xs[full], weights[full * bn :])
    return out if bias is None else out + bias


def _fp8_bits_as(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """float8_e4m3fn [..] -> (values * 2^-120 in `dtype`, 2^120) for bf16 and fp32, by moving the
    sign, exponent and mantissa bits into place (exact: e4m3's subnormals land on the wider type's
    subnormals with the same factor); other dtypes convert plainly (factor 1). NaN patterns are not
    preserved (checkpoints hold none)."""
    bits = weight.view(torch.uint8)
    if dtype == torch.bfloat16:
        a = bits.to(torch.int16)
        return (((a & 0x7F) << 4) | ((a & 0x80) << 8)).view(torch.bfloat16), 2.0**120
    if dtype == torch.float32:
        a = bits.to(torch.int32)
        return (((a & 0x7F) << 20) | ((a & 0x80) << 24)).view(torch.float32), 2.0**120
    return weight.to(dtype), 1.0


def linear_naive(x: torch.Tensor, w: BlockFp8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for `linear` and the kernel: the whole weight dequantized in fp32, one product."""
    y = F.linear(x.float(), dequantize(w), None if bias is None else bias.float())
    return y.to(x.dtype)


class BlockFp8Linear(nn.Module):
    """A bias-optional linear layer whose weight stays fp8 ([N, K]) with block scales; in place of an
    `nn.Linear` whose checkpoint weight is fp8. `weight` and `weight_scale_inv` are frozen parameters
    (so `.to(device)` moves them and `.to(dtype)` leaves fp8 alone: call `_apply` with care)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        block: tuple[int, int] = DEFAULT_BLOCK,
        parts: int = 1,
        bias_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.block, self.parts = in_features, out_features, block, parts
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(scale_shape(out_features, in_features, block, parts), dtype=torch.float32),
            requires_grad=False,
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype)) if bias else None

    @property
    def fp8(self) -> BlockFp8:
        return BlockFp8(self.weight, self.weight_scale_inv, self.block, self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = linear(x.reshape(-1, shape[-1]), self.fp8, self.bias)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, block={self.block}, parts={self.parts}"
