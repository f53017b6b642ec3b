"""Paged latent KV cache: allocation, release, sizes."""

from __future__ import annotations

import pytest
import torch

from moeserve.workers.model.kv_cache import BlockAllocator, OutOfBlocks, PagedLatentCache

pytestmark = pytest.mark.unit


def test_bytes_per_token_is_latent_only() -> None:
    cache = PagedLatentCache(
        num_layers=27, num_blocks=4, block_size=16, latent_dim=512 + 64, dtype=torch.bfloat16
    )
    assert cache.bytes_per_token_per_layer == 1152
    assert cache.bytes_per_token == 27 * 1152


def test_sequences_allocate_and_free_blocks() -> None:
    cache = PagedLatentCache(1, 5, 4, 8, torch.float32)
    a, b = cache.new_sequence(), cache.new_sequence()
    a.reserve(cache.allocator, 9)  # 3 blocks
    assert len(a.blocks) == 3 and cache.allocator.num_free == 1
    with pytest.raises(OutOfBlocks):
        b.reserve(cache.allocator, 5)
    assert b.blocks == [] and cache.allocator.num_free == 1  # all or nothing
    a.release(cache.allocator)
    assert cache.allocator.num_free == 4 and cache.allocator.num_used == 0
    b.reserve(cache.allocator, 5)
    assert 0 not in b.blocks  # block 0 is the padding block


def test_write_then_gather_round_trips() -> None:
    cache = PagedLatentCache(2, 6, 4, 3, torch.float32)
    seq = cache.new_sequence()
    seq.reserve(cache.allocator, 10)
    rows = torch.arange(30, dtype=torch.float32).view(10, 3)
    slots = torch.tensor([seq.blocks[p // 4] * 4 + p % 4 for p in range(10)])
    cache.write(1, slots, rows)
    assert torch.equal(cache.gather(1, torch.tensor(seq.blocks), 10), rows)


def test_allocator_needs_room_for_padding_block() -> None:
    with pytest.raises(ValueError):
        BlockAllocator(1)
