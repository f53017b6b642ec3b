"""Kernel bodies of `fused_moe.py` (imported on first launch; see `runtime.py`)."""

import triton
import triton.language as tl

from moeserve.workers.kernels.fp8_gemm_triton import decode_e4m3fn


@triton.jit
def gate_up_kernel(
    x_ptr,  # [T, D]
    w13_ptr,  # [E, 2I, D]
    h_ptr,  # [S, I] output, rows in padded order
    sorted_pairs_ptr,  # [S] int32
    tile_experts_ptr,  # [NB] int32
    num_padded_ptr,  # [1] int32
    num_pairs,
    num_experts,
    dim,
    inter,
    stride_xt,
    stride_we,
    stride_wn,
    top_k,
    s_ptr,  # [E, S, ceil(D/bk)] fp32 block scales of fp8 w13 (gate's grid, then up's); unused otherwise
    stride_se,
    stride_sn,
    scale_blocks_per_part,
    scale_bn,
    scale_bk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    W_SCALED: tl.constexpr,  # w13 holds float8_e4m3fn bits (uint8) with block scales
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    if tile * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(tile_experts_ptr + tile)
    if expert >= num_experts:  # another rank's pairs
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs_ptr + rows)
    row_ok = pair < num_pairs
    token = tl.where(row_ok, pair // top_k, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    w_base = w13_ptr + expert.to(tl.int64) * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        x = tl.load(
            x_ptr + token[:, None] * stride_xt + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0)
        w_up = tl.load(w_base + (cols[None, :] + inter) * stride_wn + ks[:, None], mask=w_mask, other=0)
        if W_SCALED:
            s_base = s_ptr + expert.to(tl.int64) * stride_se + (ks // scale_bk)[:, None]
            gate_rows = (cols // scale_bn)[None, :]
            s_gate = tl.load(s_base + gate_rows * stride_sn, mask=w_mask, other=0.0)
            s_up = tl.load(s_base + (gate_rows + scale_blocks_per_part) * stride_sn, mask=w_mask, other=0.0)
            w_gate = decode_e4m3fn(w_gate) * s_gate
            w_up = decode_e4m3fn(w_up) * s_up
        x = x.to(DOT_DTYPE)
        acc_gate = tl.dot(x, w_gate.to(DOT_DTYPE), acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(x, w_up.to(DOT_DTYPE), acc_up, input_precision=PRECISION)
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # silu(gate) * up
    tl.store(
        h_ptr + rows.to(tl.int64)[:, None] * inter + cols[None, :],
        h.to(h_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def down_kernel(
    h_ptr,  # [S, I]
    w2_ptr,  # [E, D, I]
    out_ptr,  # [P, D] fp32, one row per pair
    weights_ptr,  # [P] fp32 routing weights
    sorted_pairs_ptr,
    tile_experts_ptr,
    num_padded_ptr,
    num_pairs,
    num_experts,
    dim,
    inter,
    stride_we,
    stride_wn,
    s_ptr,  # [E, ceil(D/bn), ceil(I/bk)] fp32 block scales of fp8 w2; unused otherwise
    stride_se,
    stride_sn,
    scale_bn,
    scale_bk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    W_SCALED: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    if tile * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(tile_experts_ptr + tile)
    if expert >= num_experts:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs_ptr + rows)
    row_ok = pair < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < dim
    w_base = w2_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        h = tl.load(
            h_ptr + rows.to(tl.int64)[:, None] * inter + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_mask = k_ok[:, None] & col_ok[None, :]
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0)
        if W_SCALED:
            s_offsets = (cols // scale_bn)[None, :] * stride_sn + (ks // scale_bk)[:, None]
            scale = tl.load(s_ptr + expert.to(tl.int64) * stride_se + s_offsets, mask=w_mask, other=0.0)
            w = decode_e4m3fn(w) * scale
        acc = tl.dot(h.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    weight = tl.load(weights_ptr + pair, mask=row_ok, other=0.0)
    safe_pair = tl.where(row_ok, pair, 0).to(tl.int64)
    tl.store(
        out_ptr + safe_pair[:, None] * dim + cols[None, :],
        acc * weight[:, None],
        mask=row_ok[:, None] & col_ok[None, :],
    )
