"""Streaming text of one request: incremental detokenization plus stop-string matching.

`IncrementalDetokenizer` turns generated ids into text deltas that are always whole characters:
when the bytes of a character are split across tokens (byte-level BPE), the text is held back until
the character completes, so a stream never carries U+FFFD for a character that later completes.
The concatenated deltas plus `flush()` equal `tokenizer.decode(all ids)` exactly.
`StopMatcher` finds stop strings across token boundaries and holds back text that may begin one.
Neither knows about the model or the scheduler.
"""

from __future__ import annotations

from moeserve.workers.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing list of generated ids (the prompt is not part of the text)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] give context for the next delta
        self.read_offset = 0  # text of ids[:read_offset] has been emitted

    def add(self, token_id: int) -> str:
        """Append one id; return the new whole characters (possibly "")."""
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD, as in decode())."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Finds the first stop string in a text stream; text that could begin one is held back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""  # text not yet released: the longest suffix that may begin a stop string

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to release, whether a stop string was found)."""
        if not self.stops:
            return delta, False
        self.pending += delta
        hits = [i for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = self._held_suffix_len()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_suffix_len(self) -> int:
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(s[:n]):
                    longest = n
                    break
        return longest


class TextStream:
    """Detokenizer followed by stop matching: ids in, releasable text out."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...] = ()):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.matcher = StopMatcher(stops)

    def add(self, token_id: int) -> tuple[str, bool]:
        """(text to release, stop string found). After a stop, the stream is done."""
        return self.matcher.feed(self.detokenizer.add(token_id))

    def flush(self) -> str:
        """Release everything held back; the matcher sees the tail too (a stop there still cuts it)."""
        out, _ = self.matcher.feed(self.detokenizer.flush())
        return out + self.matcher.flush()
