"""Paged MLA decode attention (the absorbed form) as two Triton kernels, split over the sequence.

Each decode sequence has one query per head, already absorbed: q = [q_nope · W_UK ; rope(q_pe)]
[B, H, C + R]. All heads attend to the same cached rows [c_KV ; k_pe] (MQA), read straight from the
paged cache through the block table, so nothing is gathered or padded in memory. As in
flash-decoding, the context is cut into `splits` ranges that run in parallel (long contexts fill the
GPU even at batch 1); a second kernel merges them by their log-sum-exp. The output is the attention
over c_KV only, [B, H, C]: W_UV is applied by the caller. Every shape depends only on (B, H, C,
splits); context lengths stay on the device, so a decode step with these kernels is graph-capturable.
Legend: B decode sequences, H heads, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeserve.workers.kernels.cpu_capability import slow_16bit
from moeserve.workers.kernels.runtime import (
    check_runnable,
    dot_dtype,
    dot_precision,
    kernel_module,
    next_power_of_2,
)

BLOCK_N = 32  # context rows per step of the online softmax
TARGET_PROGRAMS = 264  # about two programs per SM of an H100/H200 (132 SMs)
MAX_SPLITS = 32


def num_splits(batch: int, heads: int, max_context: int, block_h: int = 16) -> int:
    """Splits of the context: enough programs to fill the GPU, none shorter than BLOCK_N rows.
    A function of static sizes only (the longest context allowed, not the current one)."""
    programs = batch * -(-heads // block_h)
    wanted = -(-TARGET_PROGRAMS // programs)
    return max(1, min(wanted, MAX_SPLITS, -(-max_context // BLOCK_N)))


def paged_mla_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    splits: int = 1,
) -> torch.Tensor:
    """softmax(q · [c_KV ; k_pe]^T · scale) · c_KV per sequence and head -> [B, H, C] in q's dtype.

    q [B, H, C + R]; cache [num_blocks, block_size, C + R] (one layer); block_tables [B, nb] int
    (entries past a sequence's context are never read); context_lens [B] int, each >= 1 and covered
    by its table. `scale` is the softmax scale, YaRN's mscale correction included.
    """
    b, heads, width = q.shape
    _, block_size, latent_dim = cache.shape
    if width != latent_dim or block_tables.shape[0] != b or context_lens.shape != (b,):
        raise ValueError(
            f"paged_mla_decode shapes: q {tuple(q.shape)}, cache {tuple(cache.shape)}, "
            f"block_tables {tuple(block_tables.shape)}, context_lens {tuple(context_lens.shape)}"
        )
    out = q.new_empty(b, heads, kv_lora_rank)
    if b == 0:
        return out
    kernels = kernel_module("mla_decode_triton")
    check_runnable(kernels.split_kernel, q.device)
    rope = latent_dim - kv_lora_rank
    block_h = 16  # tl.dot needs 16 rows; heads past H are masked
    o_part = torch.empty(b, heads, splits, kv_lora_rank, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, heads, splits, dtype=torch.float32, device=q.device)
    q = q.contiguous()
    kernels.split_kernel[(b, -(-heads // block_h), splits)](
        q, cache, block_tables, context_lens, o_part, lse_part, heads, float(scale),
        q.stride(0), q.stride(1), block_tables.stride(0), block_size, kv_lora_rank, rope, splits,
        BLOCK_H=block_h,
        BLOCK_C=next_power_of_2(kv_lora_rank), BLOCK_R=max(16, next_power_of_2(rope)), BLOCK_N=BLOCK_N,
        DOT_DTYPE=dot_dtype(q.dtype, kernels.split_kernel), PRECISION=dot_precision(q.dtype),
        num_warps=4, num_stages=2,
    )  # fmt: skip
    kernels.combine_kernel[(b, heads)](
        o_part, lse_part, out, out.stride(0), out.stride(1), heads, kv_lora_rank, splits,
        BLOCK_S=next_power_of_2(splits),
        BLOCK_C=next_power_of_2(kv_lora_rank), num_warps=4,
    )  # fmt: skip
    return out


def paged_mla_decode_torch(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    splits: int = 1,
) -> torch.Tensor:
    """`paged_mla_decode` in torch ops for devices without the kernels: gathers every table entry's
    block ([B, nb * block_size, C + R]) and masks past each context. Sync-free with static shapes;
    `splits` is accepted for the same signature and has no effect."""
    b, nb = block_tables.shape
    _, block_size, width = cache.shape
    latents = cache[block_tables].view(b, nb * block_size, width)  # [B, L, C+R]
    q_in = q
    if slow_16bit(cache.dtype, cache.device):  # no native bf16 (AVX2): fp32 bmm is far faster
        q_in, latents = q.float(), latents.float()
    scores = torch.bmm(q_in, latents.transpose(1, 2)).float() * scale  # [B, H, L]
    beyond = torch.arange(nb * block_size, device=q.device)[None, None, :] >= context_lens[:, None, None]
    probs = scores.masked_fill(beyond, float("-inf")).softmax(dim=-1).to(latents.dtype)
    return torch.bmm(probs, latents[..., :kv_lora_rank]).to(q.dtype)  # [B, H, C]


def paged_mla_decode_for(device: torch.device) -> Callable[..., torch.Tensor]:
    """The Triton kernels on CUDA, their torch form elsewhere."""
    return paged_mla_decode if device.type == "cuda" else paged_mla_decode_torch
