"""Cache-aware routing: which target (an attention rank of one model instance, or one model instance
behind Ray Serve) a request goes to, so that requests sharing a prefix meet the cache holding it.

The router keeps its own approximate index, `PrefixIndex`; it never asks the targets. For each
target it remembers the chained block hashes of the prompts it sent there (SGLang's router keeps a
radix tree of routed prompts to the same end; chained hashes are that tree, flattened: a prompt's
i-th hash names its whole prefix up to block i), least recently routed first, bounded by the
target's KV capacity in blocks, so entries age out about when the target's own LRU would evict
them. It is a guess: a target may have evicted a block sooner (other traffic, preemption) or hold
blocks the router never routed (outputs); a wrong guess costs a recomputed prefix, never an output.

The rule (`choose`): the target holding the longest cached prefix of the prompt (ties: the least
loaded, then the lowest index) gets the request, unless its load exceeds the least loaded target's
by more than `margin` requests in flight; then, and when no target holds any of the prompt, the
least loaded target gets it (ties: the one with the fewest blocks in the index, so a new prefix goes
to the emptiest cache, as SGLang's router sends unmatched prompts to its smallest tree). Load is
requests in flight, as the router counts them.
This module is plain data: no torch, no processes; the front ends (`server.local_ranks`,
`ray_app.ranks`, `ray_app.prefix_router`) own one index each and call it under their own locks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

from moeserve.workers.model.kv_cache import BlockHash, chain_hashes, root_hash

LOAD_MARGIN = 8
"""Default `margin`: requests in flight a target may have beyond the least loaded one and still get
the requests whose prefix it holds (a prefill saved is worth a short wait; a pile-up is not)."""

T = TypeVar("T", bound=Hashable)


def choose(
    matched: Sequence[int],
    loads: Sequence[int],
    margin: int = LOAD_MARGIN,
    sizes: Sequence[int] | None = None,
) -> int:
    """The index of the target to route to, from each target's matched prefix (blocks), its load and
    (to break ties of load) the blocks its index holds."""
    if not loads or len(matched) != len(loads):
        raise ValueError(f"need one match and one load per target, got {len(matched)} and {len(loads)}")
    size = sizes if sizes is not None else [0] * len(loads)
    least = min(range(len(loads)), key=lambda i: (loads[i], size[i], i))
    best = min(range(len(loads)), key=lambda i: (-matched[i], loads[i], i))
    if matched[best] == 0 or loads[best] > loads[least] + margin:
        return least
    return best


class PrefixIndex(Generic[T]):
    """Per target, the block hashes of the prompts routed there (bounded LRU)."""

    def __init__(self, block_size: int, capacity_blocks: int):
        if block_size < 1 or capacity_blocks < 1:
            raise ValueError(
                f"block_size and capacity_blocks must be >= 1, got {block_size}, {capacity_blocks}"
            )
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self._root = root_hash(b"router")
        self._targets: dict[T, OrderedDict[BlockHash, None]] = {}

    def hashes(self, prompt_ids: Sequence[int]) -> list[BlockHash]:
        """The prompt's full-block hashes (the router's own chain; the engines keep theirs)."""
        return chain_hashes(prompt_ids, self.block_size, self._root)

    def matched_blocks(self, target: T, hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of `hashes` the target is believed to hold."""
        held = self._targets.get(target)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def record(self, target: T, hashes: Sequence[BlockHash]) -> None:
        """The prompt went to `target`: its blocks are the most recent there, its head the newest
        (a head shared by many prompts outlives their tails, as in the engine's own LRU)."""
        held = self._targets.setdefault(target, OrderedDict())
        for h in reversed(hashes):
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity_blocks:
            held.popitem(last=False)

    def forget(self, target: T) -> None:
        """The target lost its cache (restarted, removed)."""
        self._targets.pop(target, None)

    def retain(self, targets: Sequence[T]) -> None:
        """Forget every target not in `targets`."""
        keep = set(targets)
        for target in [t for t in self._targets if t not in keep]:
            del self._targets[target]

    def size(self, target: T) -> int:
        """Blocks the index holds for `target`."""
        return len(self._targets.get(target, ()))

    def choose(
        self, targets: Sequence[T], loads: Sequence[int], hashes: Sequence[BlockHash], margin: int
    ) -> T:
        """The target `choose` picks for a prompt of these hashes (nothing recorded)."""
        matched = [self.matched_blocks(t, hashes) for t in targets]
        return targets[choose(matched, loads, margin, [self.size(t) for t in targets])]
