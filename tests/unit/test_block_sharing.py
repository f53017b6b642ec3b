"""A hypothesis state machine over the block allocator with sharing: random admit / extend / finish /
cancel / truncate / evict sequences never free a block in use, never leak one, never share or write
into a partial or registered block, hand out cached blocks only with the right content, and keep the
free count equal to capacity minus the blocks referenced."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from moeserve.workers.model.kv_cache import (
    BlockAllocator,
    OutOfBlocks,
    SequenceBlocks,
    chain_hashes,
    root_hash,
)

pytestmark = pytest.mark.unit
BS = 2
NUM_BLOCKS = 12  # 11 usable
ROOT = root_hash(b"test")
tokens_strategy = st.lists(st.integers(0, 2), min_size=1, max_size=9)  # a tiny alphabet: prefixes repeat


class Seq:
    def __init__(self, tokens: list[int]):
        self.tokens = tokens  # every token the sequence has; `blocks.num_tokens` of them are computed
        self.blocks = SequenceBlocks(BS)


class SharingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.allocator = BlockAllocator(NUM_BLOCKS)
        self.seqs: list[Seq] = []
        self.content: dict[int, list[int]] = {}  # block -> tokens written into it (its slots)

    # the engine's steps, as the scheduler and prefix cache perform them
    def _write(self, seq: Seq, start: int, end: int) -> None:
        for pos in range(start, end):
            block = seq.blocks.blocks[pos // BS]
            assert self.allocator.ref_count(block) == 1, "write into a shared block"
            assert self.allocator.hash_of(block) is None, "write into a registered block"
            slots = self.content.setdefault(block, [-1] * BS)
            slots[pos % BS] = seq.tokens[pos]

    def _compute(self, seq: Seq, n: int) -> bool:
        """Reserve and compute n more tokens; False (nothing changed) when the blocks are not free."""
        try:
            seq.blocks.reserve(self.allocator, n)
        except OutOfBlocks:
            return False
        start = seq.blocks.num_tokens
        self._write(seq, start, start + n)
        seq.blocks.num_tokens += n
        seq.blocks.commit(self.allocator, seq.tokens, ROOT)
        return True

    @rule(tokens=tokens_strategy, first=st.integers(1, 9))
    def admit(self, tokens: list[int], first: int) -> None:
        seq = Seq(tokens)
        limit = (len(tokens) - 1) // BS  # never the block of the last token
        cached = self.allocator.lookup(chain_hashes(tokens, BS, ROOT)[:limit])
        for i, block in enumerate(cached):  # a cached block holds exactly the prefix it is named by
            assert self.content[block] == tokens[i * BS : (i + 1) * BS]
        seq.blocks.adopt(self.allocator, cached)
        n = min(first, len(tokens) - seq.blocks.num_tokens)
        if self._compute(seq, n):
            self.seqs.append(seq)
        else:
            seq.blocks.release(self.allocator)  # not admitted: the adopted blocks go back

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), more=st.lists(st.integers(0, 2), max_size=4), n=st.integers(1, 5))
    def extend(self, data: st.DataObject, more: list[int], n: int) -> None:
        seq = data.draw(st.sampled_from(self.seqs))
        seq.tokens += more  # generated tokens join the sequence
        n = min(n, len(seq.tokens) - seq.blocks.num_tokens)
        if n:
            self._compute(seq, n)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), commit=st.booleans())
    def finish_or_cancel(self, data: st.DataObject, commit: bool) -> None:
        seq = data.draw(st.sampled_from(self.seqs))
        self.seqs.remove(seq)
        if commit:
            seq.blocks.commit(self.allocator, seq.tokens, ROOT)
        seq.blocks.release(self.allocator)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), back=st.integers(0, 5))
    def truncate(self, data: st.DataObject, back: int) -> None:
        seq = data.draw(st.sampled_from(self.seqs))
        target = max(0, seq.blocks.num_tokens - back)
        kept = seq.blocks.truncate(target, self.allocator)
        assert kept <= target and target - kept < BS
        del seq.tokens[max(kept, 1) :]  # rolled-back tokens are replaced by others later

    @rule()
    def evict(self) -> None:
        """A one-block sequence that needs a fresh block (evicting a cached one if need be)."""
        if self.allocator.num_free == 0:
            with pytest.raises(OutOfBlocks):
                self.allocator.allocate()
            return
        block = self.allocator.allocate()
        assert self.allocator.ref_count(block) == 1 and self.allocator.hash_of(block) is None
        self.content.pop(block, None)  # a fresh block: old content gone
        self.allocator.free([block])

    @invariant()
    def references_match_the_sequences(self) -> None:
        held: dict[int, int] = {}
        for seq in self.seqs:
            assert len(set(seq.blocks.blocks)) == len(seq.blocks.blocks)
            for block in seq.blocks.blocks:
                held[block] = held.get(block, 0) + 1
        for block in range(1, NUM_BLOCKS):
            assert self.allocator.ref_count(block) == held.get(block, 0), block
        assert 0 not in held  # the padding block is never handed out
        assert self.allocator.num_free == NUM_BLOCKS - 1 - len(held)
        assert self.allocator.num_used == len(held)

    @invariant()
    def only_full_computed_blocks_are_shared_or_registered(self) -> None:
        for seq in self.seqs:
            full = seq.blocks.num_tokens // BS
            for i, block in enumerate(seq.blocks.blocks):
                if i >= full:
                    assert self.allocator.ref_count(block) == 1, "a partial block is shared"
                    assert self.allocator.hash_of(block) is None, "a partial block is registered"

    @invariant()
    def registered_blocks_hold_their_prefix(self) -> None:
        for seq in self.seqs:
            hashes = chain_hashes(seq.tokens[: seq.blocks.num_tokens], BS, ROOT)
            for i, h in enumerate(hashes):
                block = seq.blocks.blocks[i]
                assert self.content[block] == seq.tokens[i * BS : (i + 1) * BS]
                registered = self.allocator.hash_of(block)
                assert registered is None or registered == h


TestBlockSharing = SharingMachine.TestCase
TestBlockSharing.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
