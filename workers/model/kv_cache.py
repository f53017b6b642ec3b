"""Paged latent KV cache for MLA: fixed-size blocks of `[c_KV ; k_pe]` rows, per layer.

Each cached token costs `kv_lora_rank + qk_rope_head_dim` values per layer (576 for DeepSeek-V2,
1,152 bytes in bf16): the compressed latent, never the expanded per-head keys and values.
`BlockAllocator` hands out block ids, counts references to shared blocks and keeps the prefix cache:
a full, computed block may be registered under its `BlockHash` (chained over its parent block's hash
and its own token ids, from a root that names the model revision), and a block whose last user let
go stays cached until a new block is needed (least recently used first). Only full blocks are
registered, so nothing is ever written into a block someone else may share. `SequenceBlocks` is one
sequence's block table. This module does not decide admission, preemption or what to reuse: the
scheduler and `engine.prefix_cache` do, using `num_free`, `lookup` and `register`.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

BlockHash = bytes  # 16 bytes of BLAKE2b: collisions are not a practical concern at 128 bits


class OutOfBlocks(RuntimeError):
    """Raised when a sequence needs a block and none is free."""


def root_hash(salt: bytes = b"") -> BlockHash:
    """The parent hash of every sequence's first block: `salt` names what else changes a block's
    content (the model revision and dtype), so blocks of another model can never match."""
    return hashlib.blake2b(b"moeserve-kv\0" + salt, digest_size=16).digest()


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """The hash of one full block: its parent's hash and its token ids (so it names the whole prefix)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def chain_hashes(
    token_ids: Sequence[int], block_size: int, parent: BlockHash, start: int = 0, end: int | None = None
) -> list[BlockHash]:
    """Hashes of the full blocks `start // block_size ..` of `token_ids`, up to `end` tokens
    (a multiple of `block_size`; default: every full block), the first one's parent being `parent`."""
    end = len(token_ids) // block_size * block_size if end is None else end
    out: list[BlockHash] = []
    for s in range(start, end, block_size):
        parent = hash_block(parent, token_ids[s : s + block_size])
        out.append(parent)
    return out


class BlockAllocator:
    """Block ids with reference counts and a prefix cache. Block 0 is reserved as padding.

    Every usable block is in exactly one state: free (no content anyone wants), cached-free
    (registered under a hash, no reference; evictable, least recently used first) or in use (one
    reference or more, registered or not). `num_free` counts free and cached-free blocks: both can be
    handed out by `allocate`. With `caching=False`, `register` does nothing and `lookup` finds nothing.
    """

    def __init__(self, num_blocks: int, caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.caching = caching
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._block_of: dict[BlockHash, int] = {}  # registered hash -> its block
        self._hash_of: dict[int, BlockHash] = {}  # registered block -> its hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached-free, least recent first
        self.evictions = 0  # cached blocks reused for new content so far

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - 1 - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered blocks (in use or cached-free)."""
        return len(self._block_of)

    @property
    def num_cached_free(self) -> int:
        return len(self._evictable)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def hash_of(self, block: int) -> BlockHash | None:
        return self._hash_of.get(block)

    def allocate(self) -> int:
        """A block with no content, one reference; evicts the least recently used cached-free one
        when no plain free block is left."""
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self.evictions += 1
        else:
            raise OutOfBlocks("no free KV-cache block")
        self._refs[block] = 1
        return block

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block. A block left unreferenced becomes cached-free if it is
        registered, else free. The last block of `blocks` lets go first, so a sequence's tail is
        evicted before its head (a head is shared by more prompts)."""
        for block in reversed(blocks):
            if self._refs[block] <= 0:
                raise ValueError(f"block {block} freed more often than it was referenced")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The blocks of the longest cached run of `hashes` from the first; takes no reference."""
        if not self.caching:
            return []
        out: list[int] = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def acquire(self, block: int) -> None:
        """One more reference to a registered block found by `lookup` (it leaves the evictable set)."""
        if block not in self._hash_of:
            raise ValueError(f"block {block} is not cached")
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def register(self, block: int, h: BlockHash) -> bool:
        """Offer a full, computed, in-use block to the cache under `h`. False when caching is off or
        another block already holds `h` (this one then stays private and is freed as usual)."""
        if not self.caching or h in self._block_of or block in self._hash_of:
            return False
        if self._refs[block] <= 0:
            raise ValueError(f"block {block} is not in use")
        self._block_of[h] = block
        self._hash_of[block] = h
        return True

    def clear_cache(self) -> None:
        """Forget every cached-free block (they become free); blocks in use keep their registration."""
        for block in self._evictable:
            del self._block_of[self._hash_of.pop(block)]
            self._free.append(block)
        self._evictable.clear()


@dataclass
class SequenceBlocks:
    """The block table of one sequence, how many of its tokens are cached, and its block hashes.

    `hashes[i]` is the chained hash of full block i of the sequence's tokens; they depend only on the
    token ids, so they outlive a `release` (a preempted sequence finds its blocks by them). The first
    `num_committed` blocks have been offered to the allocator's cache (`commit`).
    """

    block_size: int
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0
    hashes: list[BlockHash] = field(default_factory=list)
    num_committed: int = 0

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

    def adopt(self, allocator: BlockAllocator, cached: list[int]) -> None:
        """Start an empty sequence on cached blocks (from `allocator.lookup` over `hashes`)."""
        if self.blocks or self.num_tokens:
            raise ValueError("adopt needs an empty sequence")
        for block in cached:
            allocator.acquire(block)
        self.blocks = list(cached)
        self.num_tokens = len(cached) * self.block_size
        self.num_committed = len(cached)

    def commit(self, allocator: BlockAllocator, token_ids: Sequence[int], root: BlockHash) -> None:
        """Register every full block of the computed tokens not offered yet. `token_ids` are the
        sequence's tokens (at least `num_tokens` of them, all accepted: a speculative draft that may
        be rolled back must not be counted in `num_tokens` yet)."""
        full = self.num_tokens // self.block_size
        if full <= self.num_committed:
            return
        if len(self.hashes) < full:
            parent = self.hashes[-1] if self.hashes else root
            start = len(self.hashes) * self.block_size
            self.hashes += chain_hashes(token_ids, self.block_size, parent, start, full * self.block_size)
        for i in range(self.num_committed, full):
            allocator.register(self.blocks[i], self.hashes[i])
        self.num_committed = full

    def truncate(self, num_tokens: int, allocator: BlockAllocator) -> int:
        """Keep only the first `num_tokens` computed tokens (e.g. rejected speculative tokens roll
        back) and free the blocks past them. A registered block is never written again: if the cut
        falls inside one, that block is let go too and the sequence keeps the tokens before it.
        Returns the tokens kept (`num_tokens`, or less in that case); the caller recomputes the rest."""
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(f"truncate to {num_tokens} tokens: the sequence has {self.num_tokens}")
        bs = self.block_size
        keep_blocks = -(-num_tokens // bs)
        cut = num_tokens // bs  # index of the block the cut falls into, when it is partial
        if num_tokens % bs and cut < len(self.blocks) and allocator.hash_of(self.blocks[cut]) is not None:
            keep_blocks, num_tokens = cut, cut * bs
        allocator.free(self.blocks[keep_blocks:])
        del self.blocks[keep_blocks:]
        self.num_tokens = num_tokens
        full = num_tokens // bs
        del self.hashes[full:]
        self.num_committed = min(self.num_committed, full)
        return num_tokens

    def release(self, allocator: BlockAllocator) -> None:
        """Drop every block (registered ones stay cached); the hashes are kept."""
        allocator.free(self.blocks)
        self.blocks = []
        self.num_tokens = 0
        self.num_committed = 0


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
