"""Paged latent KV cache for MLA: fixed-size blocks of `[c_KV ; k_pe]` rows, per layer.

Each cached token costs `kv_lora_rank + qk_rope_head_dim` values per layer (576 for DeepSeek-V2,
1,152 bytes in bf16): the compressed latent, never the expanded per-head keys and values.
`BlockAllocator` hands out block ids; `SequenceBlocks` is one sequence's block table.
This module does not decide admission or preemption: the scheduler does, using `num_free`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class OutOfBlocks(RuntimeError):
    """Raised when a sequence needs a block and none is free."""


class BlockAllocator:
    """A free list of block ids. Block 0 is reserved as padding for batched gathers."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("no free KV-cache block")
        return self._free.pop()

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass
class SequenceBlocks:
    """The block table of one sequence and how many of its tokens are cached."""

    block_size: int
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def blocks_needed(self, new_tokens: int) -> int:
        total = self.num_tokens + new_tokens
        return max(0, -(-total // self.block_size) - len(self.blocks))

    def reserve(self, allocator: BlockAllocator, new_tokens: int) -> None:
        """Make room for `new_tokens` more tokens; all or nothing."""
        needed = self.blocks_needed(new_tokens)
        if needed > allocator.num_free:
            raise OutOfBlocks(f"need {needed} blocks, {allocator.num_free} free")
        for _ in range(needed):
            self.blocks.append(allocator.allocate())

    def release(self, allocator: BlockAllocator) -> None:
        allocator.free(self.blocks)
        self.blocks = []
        self.num_tokens = 0


class PagedLatentCache:
    """Storage [layers][num_blocks, block_size, latent_dim] plus the allocator over its blocks."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        latent_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.block_size = block_size
        self.latent_dim = latent_dim
        self.dtype = dtype
        self.layers = [
            torch.zeros(num_blocks, block_size, latent_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.allocator = BlockAllocator(num_blocks)

    @property
    def bytes_per_token_per_layer(self) -> int:
        return self.latent_dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_per_layer * len(self.layers)

    def new_sequence(self) -> SequenceBlocks:
        return SequenceBlocks(self.block_size)

    def write(self, layer: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """rows [T, latent_dim] go to flat slots [T] (block * block_size + offset)."""
        self.layers[layer].view(-1, self.latent_dim).index_copy_(0, slots, rows.to(self.dtype))

    def gather(self, layer: int, block_table: torch.Tensor, length: int) -> torch.Tensor:
        """The first `length` cached rows of one sequence: [length, latent_dim]."""
        return self.layers[layer][block_table].view(-1, self.latent_dim)[:length]

    def gather_batch(self, layer: int, block_tables: torch.Tensor) -> torch.Tensor:
        """Padded rows of many sequences: block_tables [B, nb] -> [B, nb * block_size, latent_dim]."""
        b, nb = block_tables.shape
        return self.layers[layer][block_tables].view(b, nb * self.block_size, self.latent_dim)
