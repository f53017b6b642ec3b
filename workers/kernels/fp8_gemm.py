"""Block-scaled FP8 weights in products: the torch dequantization and the Triton GEMM.

A weight W [N, K] is stored as float8_e4m3fn with one fp32 scale per bn x bk block (DeepSeek-V3's
`weight_scale_inv`, partial last blocks included); its rows may be `parts` equal parts stacked
(gate ; up), each on its own block grid. `fp8_block_linear` computes x @ (W * scale)^T with the
weight tile dequantized in registers (fp8 bits decoded, times its block's scale) right before
`tl.dot`, accumulating in fp32: weight-only, activations stay in x's dtype. It reads the fp8 bytes
as uint8 and decodes them exactly (normals and subnormals), so the same kernel runs compiled and
under Triton's interpreter. `dequantize_blocks` is the naive torch form, the reference.
Legend: M rows of x, N output features, K input features, S scale rows, bn x bk the block.
"""

from __future__ import annotations

import torch

from moeserve.workers.kernels.runtime import check_runnable, dot_dtype, dot_precision, kernel_module


def expand_block_scales(
    scale_inv: torch.Tensor, rows: int, cols: int, block: tuple[int, int], parts: int = 1
) -> torch.Tensor:
    """scale_inv [..., S, ceil(cols/bk)] -> one scale per element [..., rows, cols] (fp32)."""
    bn, bk = block
    per_col = scale_inv.float().repeat_interleave(bk, dim=-1)[..., :cols]  # [..., S, cols]
    per_part = rows // parts
    return torch.cat(
        [p.repeat_interleave(bn, dim=-2)[..., :per_part, :] for p in per_col.chunk(parts, dim=-2)], dim=-2
    )


def dequantize_blocks(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    parts: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """weight.float() * its block's scale_inv, every element -> [..., N, K] in `dtype`."""
    rows, cols = weight.shape[-2:]
    return (weight.float() * expand_block_scales(scale_inv, rows, cols, block, parts)).to(dtype)


def fp8_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    parts: int = 1,
    tiles: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequantize(weight)^T -> [M, N] in x's dtype, one Triton launch.

    `tiles` (BLOCK_M, BLOCK_N, BLOCK_K): any sizes (powers of two); by default thin for decode."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape != (n, k) or weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_block_linear: x {tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)}")
    out = x.new_empty(m, n)
    if m == 0:
        return out
    kernels = kernel_module("fp8_gemm_triton")
    check_runnable(kernels.fp8_block_gemm_kernel, x.device)
    block_m, block_n, block_k = tiles or ((16, 64, 64) if m <= 16 else (64, 64, 64))
    x = x.contiguous()
    w = weight.contiguous().view(torch.uint8)
    s = scale_inv.float().contiguous()
    rows_per_part = n // parts
    grid = (-(-m // block_m), -(-n // block_n))
    kernels.fp8_block_gemm_kernel[grid](
        x, w, s, out, m, n, k, x.stride(0), w.stride(0), s.stride(0), out.stride(0),
        rows_per_part, -(-rows_per_part // block[0]), block[0], block[1],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_DTYPE=dot_dtype(x.dtype, kernels.fp8_block_gemm_kernel), PRECISION=dot_precision(x.dtype),
    )  # fmt: skip
    return out
