"""The engine's use of the prefix cache: which cached blocks a request starts on, and which of its
computed blocks enter the cache.

The cache itself (hashes, reference counts, LRU eviction) is `model.kv_cache.BlockAllocator`. Here:
a request is matched once, when it is admitted (fresh, or again after a preemption): it adopts the
longest run of its leading full blocks that is cached, never the block holding its last token, so
that token is always computed and its logits exist. A running request's blocks enter the cache once
all their tokens are computed (`commit`, at the start of every schedule and before its blocks are
released), so a block never enters the cache half written or holding a draft that may be rolled back.
This module does not allocate or schedule; `Scheduler` calls it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from moeserve.workers.engine.request import Request
from moeserve.workers.model.kv_cache import BlockAllocator, BlockHash, chain_hashes, root_hash


def model_cache_salt(model_path: Path, dtype: str) -> bytes:
    """What names the model revision in block hashes: config.json's bytes, the weight files' names,
    sizes and modification times, and the dtype. Cheap (no weights are read)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(dtype.encode())
    config = model_path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for path in sorted(model_path.glob("*.safetensors*")):
        stat = path.stat()
        h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.digest()


class PrefixCache:
    """Matching and committing a request's blocks, and the hit counters of one engine."""

    def __init__(self, allocator: BlockAllocator, enabled: bool = True, salt: bytes = b""):
        self.allocator = allocator
        self.enabled = enabled
        self.root: BlockHash = root_hash(salt)
        self.queried_tokens = 0  # prompt tokens of first admissions
        self.hit_tokens = 0  # of those, tokens taken from the cache

    def match(self, request: Request) -> list[int]:
        """Cached blocks for the request's leading tokens (no reference taken): at most the full
        blocks before its last token."""
        if not self.enabled:
            return []
        seq = request.blocks
        bs = seq.block_size
        limit = (request.num_tokens - 1) // bs
        if len(seq.hashes) < limit:
            parent = seq.hashes[-1] if seq.hashes else self.root
            start = len(seq.hashes) * bs
            tokens = request.token_slice(0, limit * bs)
            seq.hashes += chain_hashes(tokens, bs, parent, start, limit * bs)
        return self.allocator.lookup(seq.hashes[:limit])

    def record_admission(self, request: Request) -> None:
        """Count a request's first admission, just after it adopted its cached blocks (a readmission
        after preemption is the engine's own business)."""
        if request.admitted:
            return
        request.num_cached_prompt_tokens = min(request.blocks.num_tokens, len(request.prompt_ids))
        self.queried_tokens += len(request.prompt_ids)
        self.hit_tokens += request.num_cached_prompt_tokens

    def commit(self, request: Request) -> None:
        """Offer the request's newly computed full blocks to the cache."""
        seq = request.blocks
        if not self.enabled or seq.num_tokens // seq.block_size <= seq.num_committed:
            return
        seq.commit(self.allocator, request.token_slice(0, seq.num_tokens), self.root)
