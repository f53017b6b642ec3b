"""Kernel bodies of `fp8_gemm.py` (imported on first launch; see `runtime.py`)."""

import triton
import triton.language as tl


@triton.jit
def decode_e4m3fn(bits):
    """uint8 float8_e4m3fn bit patterns -> their fp32 values, exactly (NaN patterns aside)."""
    u = bits.to(tl.int32)
    exponent = (u >> 3) & 0xF
    mantissa = u & 0x7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)  # m * 2^-9
    return tl.where((u & 0x80) != 0, -magnitude, magnitude)


@triton.jit
def fp8_block_gemm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] uint8 (float8_e4m3fn bits)
    s_ptr,  # [S, ceil(K/bk)] fp32 block scales
    y_ptr,  # [M, N] output
    m,
    n,
    k,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    rows_per_part,
    blocks_per_part,
    scale_block_n,
    scale_block_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features = weight rows
    row_ok = rows < m
    col_ok = cols < n
    # each weight row's scale row: its part's grid, then its block within the part
    scale_row = (cols // rows_per_part) * blocks_per_part + (cols % rows_per_part) // scale_block_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k
        x = tl.load(
            x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_mask = k_ok[:, None] & col_ok[None, :]
        bits = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0)
        scale = tl.load(
            s_ptr + scale_row[None, :] * stride_sn + (ks // scale_block_k)[:, None], mask=w_mask, other=0.0
        )
        w = decode_e4m3fn(bits) * scale  # [BLOCK_K, BLOCK_N] fp32
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    tl.store(
        y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
