"""(token, expert) pairs grouped into expert-homogeneous tiles of `block_m` rows, on the device.

The fused MoE kernels (`fused_moe.py`) compute one tile of rows against one expert's weights, so
the T*K routed pairs are sorted by expert and each expert's run is padded to a multiple of
`block_m` (the idea of vLLM's `moe_align_block_size`, written here in torch ops). Nothing is read
back to the host: counts, offsets and the number of padded rows stay tensors, and every output has
a shape fixed by (T, K, E, block_m) alone, so the alignment is CUDA-graph capturable.
Legend: T tokens, K experts per token, E experts, P = T*K pairs, S padded rows, NB tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AlignedPairs:
    """Pairs in tile order. Row r of the padded layout holds pair `sorted_pairs[r]` (P = padding);
    tile b (rows b*block_m ...) belongs to expert `tile_experts[b]` (E = an unused tile)."""

    sorted_pairs: torch.Tensor  # [S] int32, pair index t*K + k or P for a padding row
    tile_experts: torch.Tensor  # [NB] int32
    num_padded: torch.Tensor  # [1] int32: rows in use; tiles past it are skipped
    block_m: int

    @property
    def num_tiles(self) -> int:
        return self.tile_experts.numel()


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows the padded layout can need: each expert that has pairs pads by at most block_m - 1,
    and at most min(E, P) experts have pairs."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """ids [T, K] (values in [0, num_experts]; num_experts itself marks a pair computed elsewhere,
    which lands in tiles of that pseudo-expert that the kernels skip) -> AlignedPairs."""
    t, k = ids.shape
    pairs = t * k
    device = ids.device
    flat = ids.reshape(-1)  # [P]
    if t == 1:
        # one token: its K experts are distinct, so each pair is a tile of its own; no sort at all
        rows = torch.full((pairs * block_m,), pairs, dtype=torch.int32, device=device)
        rows[::block_m] = torch.arange(pairs, dtype=torch.int32, device=device)
        used = torch.full((1,), pairs * block_m, dtype=torch.int32, device=device)
        return AlignedPairs(rows, flat.to(torch.int32), used, block_m)
    buckets = num_experts + 1  # the last bucket: pairs for another rank
    counts = torch.zeros(buckets, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E+1], no bincount: it syncs on CUDA
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts] = 0  # foreign pairs are never computed here
    padded_ends = padded.cumsum(0)
    padded_starts = padded_ends - padded
    order = torch.argsort(flat, stable=True)  # [P] pairs in expert order
    expert_of = flat[order]
    first_of_expert = counts.cumsum(0) - counts
    rank = torch.arange(pairs, device=device) - first_of_expert[expert_of]
    dest = padded_starts[expert_of] + rank  # [P] row of each sorted pair
    capacity = max_padded_rows(pairs, num_experts, block_m)
    local = expert_of < num_experts
    dest = torch.where(local, dest, capacity)  # foreign pairs: a spare row, cut off below
    rows = torch.full((capacity + 1,), pairs, dtype=torch.int32, device=device)
    rows.scatter_(0, dest, order.to(torch.int32))
    tile_starts = torch.arange(0, capacity, block_m, device=device)
    tile_experts = torch.searchsorted(padded_ends[:num_experts], tile_starts, right=True)
    used = padded_ends[num_experts - 1 : num_experts].to(torch.int32)
    return AlignedPairs(rows[:capacity], tile_experts.to(torch.int32), used, block_m)
