"""Streaming text of one request: incremental detokenization plus stop-string matching.

`IncrementalDetokenizer` turns generated ids into text deltas that are always whole characters:
when the bytes of a character are split across tokens (byte-level BPE), the text is held back until
the character completes, so a stream never carries U+FFFD for a character that later completes.
The concatenated deltas plus `flush()` equal `tokenizer.decode(all ids)` exactly.
`StopMatcher` finds stop strings across token boundaries (an Aho-Corasick automaton, so the cost
per character is independent of the number of stop strings) and holds back text that may begin one.
Neither knows about the model or the scheduler.
"""

from __future__ import annotations

from collections import deque

from moeserve.workers.model.tokenizer import Tokenizer

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


class StopAutomaton:
    """Aho-Corasick automaton over one request's stop strings, built once per request in
    O(total stop length). Stepping it over generated text finds every stop string ending at each
    character, and its state is the longest suffix of the text that may begin a stop string, so a
    matcher's cost per character does not depend on how many stop strings there are."""

    def __init__(self, stops: tuple[str, ...]):
        self.goto: list[dict[str, int]] = [{}]  # state -> char -> state (the trie's edges)
        self.fail = [0]  # state -> the state of its longest proper suffix that is in the trie
        self.depth = [0]  # state -> length of the text it stands for
        self.longest = [0]  # state -> length of the longest stop string ending there (0: none)
        for stop in stops:
            state = 0
            for ch in stop:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[state][ch] = nxt
                    self.goto.append({})
                    self.fail.append(0)
                    self.depth.append(self.depth[state] + 1)
                    self.longest.append(0)
                state = nxt
            self.longest[state] = len(stop)
        pending = deque(self.goto[0].values())  # breadth first: a suffix's state is done before
        while pending:
            state = pending.popleft()
            for ch, child in self.goto[state].items():
                pending.append(child)
                self.fail[child] = self.step(self.fail[state], ch) if state else 0
                self.longest[child] = max(self.longest[child], self.longest[self.fail[child]])

    def step(self, state: int, ch: str) -> int:
        while state and ch not in self.goto[state]:
            state = self.fail[state]
        return self.goto[state].get(ch, 0)


class StopMatcher:
    """Finds the first stop string in a text stream; text that could begin one is held back.

    Each `feed` costs O(len(delta)) automaton steps (amortised; never more than delta plus the
    longest stop string), however many stop strings the request has. The stop string that ends
    first wins (the longest of those ending at the same character), so where the text stops does
    not depend on how it was split into tokens."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.automaton = StopAutomaton(stops) if stops else None
        self.state = 0
        self.pending = ""  # text not yet released: the longest suffix that may begin a stop string

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to release, whether a stop string was found)."""
        automaton = self.automaton
        if automaton is None:
            return delta, False
        offset = len(self.pending)
        self.pending += delta
        state, longest = self.state, automaton.longest
        for i, ch in enumerate(delta):
            state = automaton.step(state, ch)
            if longest[state]:  # the first stop string to end; the longest of those ending here
                out, self.pending = self.pending[: offset + i + 1 - longest[state]], ""
                self.state = 0
                return out, True
        self.state = state
        cut = len(self.pending) - automaton.depth[state]
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


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
