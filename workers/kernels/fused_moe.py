"""Fused routed experts: two Triton GEMMs over expert-homogeneous tiles, no loop over experts.

1. gate/up: h = silu(x @ W_gate^T) * (x @ W_up^T) per tile of aligned rows, both halves of `w13`
   in one pass over x, SiLU and the product in fp32 before one rounding to the model dtype;
2. down: y = (h @ W_down^T) * routing weight, written to the pair's own row;
3. the K rows of each token are summed (fp32) into [T, D].
Pairs are grouped by `moe_align.align_by_expert`; tiles of unused padding are skipped on the device,
so nothing syncs with the host and every shape is fixed by (T, K, E): CUDA-graph capturable.
Weights stay in `RoutedExperts`' layout: w13 [E, 2I, D] (gate ; up), w2 [E, D, I].
Legend: T tokens, K experts per token, E experts, D hidden, I expert intermediate, P = T*K pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeserve.workers.kernels.fp8_gemm import dequantize_blocks
from moeserve.workers.kernels.moe_align import align_by_expert
from moeserve.workers.kernels.runtime import check_runnable, dot_dtype, dot_precision, kernel_module


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of both GEMMs and the launch options."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def tile_config(num_tokens: int) -> TileConfig:
    """Small batches are bound by reading the weights: thin tiles, many programs over N. Large
    batches are bound by the matmuls: taller tiles reuse each weight tile over more rows."""
    if num_tokens <= 32:
        return TileConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)
    if num_tokens <= 128:
        return TileConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
    return TileConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    foreign: bool = False,
    config: TileConfig | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) -> [T, D] in x's dtype.

    x [T, D]; w13 [E, 2I, D]; w2 [E, D, I]; ids [T, K] in [0, E) (or E = an expert not hosted here,
    only with `foreign`: such pairs add nothing); weights [T, K] (any float dtype, applied in fp32).
    fp8 experts: w13 / w2 float8_e4m3fn with `w13_scale` [E, 2 ceil(I/bn), ceil(D/bk)] (gate's grid,
    then up's) and `w2_scale` [E, ceil(D/bn), ceil(I/bk)], dequantized tile by tile in the kernels.
    """
    t, k = ids.shape
    num_experts, two_inter, dim = w13.shape
    inter = two_inter // 2
    if x.shape != (t, dim) or w2.shape != (num_experts, dim, inter) or weights.shape != (t, k):
        raise ValueError(
            f"fused_moe shapes: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, "
            f"ids {tuple(ids.shape)}, weights {tuple(weights.shape)}"
        )
    if t == 0:
        return x.new_zeros(0, dim)
    kernels = kernel_module("fused_moe_triton")
    check_runnable(kernels.gate_up_kernel, x.device)
    cfg = config or tile_config(t)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    scaled = w13_scale is not None and w2_scale is not None
    if scaled:
        w13, w2 = w13.view(torch.uint8), w2.view(torch.uint8)  # the kernels decode the fp8 bits
    s13 = w13_scale.float().contiguous() if w13_scale is not None else w13
    s2 = w2_scale.float().contiguous() if w2_scale is not None else w2
    scales13 = (s13, s13.stride(0), s13.stride(1), -(-inter // block[0]), block[0], block[1])
    scales2 = (s2, s2.stride(0), s2.stride(1), block[0], block[1])
    aligned = align_by_expert(ids, num_experts, cfg.block_m)
    pairs = t * k
    h = x.new_empty(aligned.sorted_pairs.numel(), inter)  # [S, I], rows in padded order
    alloc = torch.zeros if foreign else torch.empty  # foreign pairs' rows are never written
    out = alloc(pairs, dim, dtype=torch.float32, device=x.device)  # [P, D]
    tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    meta = dict(
        DOT_DTYPE=dot_dtype(x.dtype, kernels.gate_up_kernel),
        PRECISION=dot_precision(x.dtype),
        W_SCALED=scaled,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    routing = (aligned.sorted_pairs, aligned.tile_experts, aligned.num_padded, pairs, num_experts)
    kernels.gate_up_kernel[(aligned.num_tiles, -(-inter // cfg.block_n))](
        x, w13, h, *routing, dim, inter, x.stride(0), w13.stride(0), w13.stride(1), k, *scales13,
        **tiles, **meta,
    )  # fmt: skip
    kernels.down_kernel[(aligned.num_tiles, -(-dim // cfg.block_n))](
        h, w2, out, weights.reshape(-1).float().contiguous(), *routing, dim, inter,
        w2.stride(0), w2.stride(1), *scales2, **tiles, **meta,
    )  # fmt: skip
    return out.view(t, k, dim).sum(dim=1).to(x.dtype)  # [T, K, D] -> [T, D]


def fused_moe_torch(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    block_m: int = 16,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """The kernels' algorithm in torch ops, for devices without them: the same tiles, one batched
    matmul over all tiles instead of a program per tile. Sync-free with static shapes like the
    kernels (so a decode step using it compiles with `torch.compile(fullgraph=True)`), but it
    copies each tile's expert weights, so it is meant for small models and checks, not for speed.
    Same arguments as `fused_moe`; ids == E (not hosted) add nothing; fp8 experts' tiles are
    dequantized as they are gathered."""
    t, k = ids.shape
    num_experts, two_inter, dim = w13.shape
    pairs = t * k
    aligned = align_by_expert(ids, num_experts, block_m)
    rows = aligned.sorted_pairs.long().view(-1, block_m)  # [NB, BM]
    live = rows < pairs
    live &= (aligned.tile_experts < num_experts)[:, None]  # foreign tiles (one-token layout) too
    safe = torch.where(live, rows, 0)
    experts = aligned.tile_experts.long().clamp(max=num_experts - 1)  # [NB]
    xs = x[safe // k]  # [NB, BM, D]
    w13_tiles, w2_tiles = w13[experts], w2[experts]  # [NB, 2I, D], [NB, D, I]
    if w13_scale is not None and w2_scale is not None:
        w13_tiles = dequantize_blocks(w13_tiles, w13_scale[experts], block, parts=2, dtype=x.dtype)
        w2_tiles = dequantize_blocks(w2_tiles, w2_scale[experts], block, dtype=x.dtype)
    elif w13_tiles.dtype != x.dtype:  # bf16 weights under fp32 activations (widened experts)
        w13_tiles, w2_tiles = w13_tiles.to(x.dtype), w2_tiles.to(x.dtype)
    gate, up = torch.bmm(xs, w13_tiles.transpose(1, 2)).float().chunk(2, dim=-1)  # [NB, BM, I] each
    h = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    y = torch.bmm(h, w2_tiles.transpose(1, 2)).float()  # [NB, BM, D]
    y = y * (weights.reshape(-1).float()[safe] * live)[..., None]
    out = torch.zeros(pairs + 1, dim, dtype=torch.float32, device=x.device)  # row P: padding's sink
    out.index_add_(0, torch.where(live, rows, pairs).flatten(), y.flatten(0, 1))
    return out[:pairs].view(t, k, dim).sum(dim=1).to(x.dtype)


def fused_moe_for(device: torch.device) -> Callable[..., torch.Tensor]:
    """The routed-experts implementation for a device: the Triton kernels on CUDA, their torch
    form elsewhere (both sync-free; the CPU's eager fast path is the caller's grouped matmuls)."""
    return fused_moe if device.type == "cuda" else fused_moe_torch
