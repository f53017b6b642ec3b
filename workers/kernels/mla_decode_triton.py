"""Kernel bodies of `mla_decode.py` (imported on first launch; see `runtime.py`)."""

import triton
import triton.language as tl


@triton.jit
def split_kernel(
    q_ptr,  # [B, H, C + R]: W_UK-absorbed query ; rotated q_pe
    cache_ptr,  # [num_blocks, block_size, C + R] one layer of the paged latent cache
    block_tables_ptr,  # [B, max_blocks] int
    context_ptr,  # [B] int, tokens of context (the new one included)
    o_part_ptr,  # [B, H, splits, C] fp32, each split's normalised output
    lse_part_ptr,  # [B, H, splits] fp32, each split's log-sum-exp (-inf: empty split)
    num_heads,
    scale,
    stride_qb,
    stride_qh,
    stride_tb,
    block_size,  # rows per cache block
    latent,  # C
    rope,  # R
    splits,
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(context_ptr + b).to(tl.int32)
    # each split takes a whole number of BLOCK_N tiles; splits past the context stay empty
    per_split = tl.cdiv(tl.cdiv(context, splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, context)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < latent
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < rope
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_rows + cs[None, :], mask=head_ok[:, None] & c_ok[None, :], other=0.0)
    q_pe = tl.load(q_rows + latent + rs[None, :], mask=head_ok[:, None] & r_ok[None, :], other=0.0)
    q_lat = q_lat.to(DOT_DTYPE)
    q_pe = q_pe.to(DOT_DTYPE)
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        block = tl.load(
            block_tables_ptr + b.to(tl.int64) * stride_tb + pos // block_size, mask=pos_ok, other=0
        )
        row = (block.to(tl.int64) * block_size + pos % block_size) * (latent + rope)
        kv_lat = tl.load(
            cache_ptr + row[:, None] + cs[None, :], mask=pos_ok[:, None] & c_ok[None, :], other=0.0
        )
        kv_pe = tl.load(
            cache_ptr + row[:, None] + latent + rs[None, :], mask=pos_ok[:, None] & r_ok[None, :], other=0.0
        )
        kv_lat = kv_lat.to(DOT_DTYPE)
        scores = tl.dot(q_lat, tl.trans(kv_lat), input_precision=PRECISION)
        scores = tl.dot(q_pe, tl.trans(kv_pe.to(DOT_DTYPE)), scores, input_precision=PRECISION)
        scores = tl.where(pos_ok[None, :], scores * scale, float("-inf"))  # [BLOCK_H, BLOCK_N]
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        s = s * alpha + tl.sum(p, axis=1)
        # probabilities round to the cache dtype before the value product, as the torch path does
        p = p.to(cache_ptr.dtype.element_ty).to(DOT_DTYPE)
        acc = tl.dot(p, kv_lat, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new
    nonempty = s > 0
    out = acc / tl.where(nonempty, s, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, s, 1.0)), float("-inf"))
    part = (b.to(tl.int64) * num_heads + heads) * splits + split  # [BLOCK_H]
    tl.store(o_part_ptr + part[:, None] * latent + cs[None, :], out, mask=head_ok[:, None] & c_ok[None, :])
    tl.store(lse_part_ptr + part, lse, mask=head_ok)


@triton.jit
def combine_kernel(
    o_part_ptr,  # [B, H, splits, C] fp32
    lse_part_ptr,  # [B, H, splits] fp32
    out_ptr,  # [B, H, C]
    stride_ob,
    stride_oh,
    num_heads,
    latent,
    splits,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split_ids = tl.arange(0, BLOCK_S)
    split_ok = split_ids < splits
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < latent
    base = (b.to(tl.int64) * num_heads + h) * splits
    lse = tl.load(lse_part_ptr + base + split_ids, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)  # finite: split 0 always holds the first token
    w = tl.exp(lse - top)  # [BLOCK_S], 0 for empty splits
    parts = tl.load(
        o_part_ptr + (base + split_ids)[:, None] * latent + cs[None, :],
        mask=split_ok[:, None] & c_ok[None, :],
        other=0.0,
    )
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + cs, out.to(out_ptr.dtype.element_ty), mask=c_ok
    )
