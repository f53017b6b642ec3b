"""Streaming text: incremental detokenization never splits a character; stop strings match across
token boundaries and text that may begin one is held back."""

from __future__ import annotations

import pytest
from builders import train_byte_level_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.workers.engine.text import (
    REPLACEMENT,
    IncrementalDetokenizer,
    StopAutomaton,
    StopMatcher,
    TextStream,
)
from moeserve.workers.model.tokenizer import Tokenizer

pytestmark = pytest.mark.unit
TEXT = "Grüße aus Köln 日本語 🙂🚀 café — “€”"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(train_byte_level_tokenizer())  # type: ignore[arg-type]


def byte_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""
    pieces = [p for p, _ in tokenizer.inner.pre_tokenizer.pre_tokenize_str(text)]
    ids = [tokenizer.inner.token_to_id(ch) for piece in pieces for ch in piece]
    assert None not in ids
    return ids


@pytest.mark.parametrize("split", ["bpe", "bytes"])
def test_deltas_are_whole_characters_and_concatenate_to_the_text(tokenizer: Tokenizer, split: str) -> None:
    ids = tokenizer.encode(TEXT) if split == "bpe" else byte_tokens(tokenizer, TEXT)
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)  # some token holds part of a character
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids]
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == TEXT
    assert "" in deltas  # text was held back while a character was incomplete


def test_flush_matches_decode_of_an_unfinished_character(tokenizer: Tokenizer) -> None:
    ids = byte_tokens(tokenizer, "ab🙂")[:-1]  # the emoji's last byte never comes
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.add(i) for i in ids)
    assert streamed == "ab" and streamed + detok.flush() == tokenizer.decode(ids)


def test_stop_string_across_token_boundaries(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, stops=("Köln 日",))
    out, stopped = "", False
    for i in byte_tokens(tokenizer, TEXT):
        text, stopped = stream.add(i)
        out += text
        if stopped:
            break
    assert stopped and out == "Grüße aus "


def test_text_that_may_begin_a_stop_string_is_held_then_released() -> None:
    matcher = StopMatcher(("World!",))
    assert matcher.feed("Hello Wor") == ("Hello ", False)
    assert matcher.feed("ld") == ("", False)
    assert matcher.feed("wide") == ("Worldwide", False)
    assert matcher.feed(" Wo") == (" ", False)
    assert matcher.flush() == "Wo"


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.text(alphabet="abcxyz", max_size=4), max_size=12),
    stops=st.lists(st.text(alphabet="abcxyz", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_matcher_equals_searching_the_whole_text(chunks: list[str], stops: list[str]) -> None:
    matcher = StopMatcher(tuple(stops))
    out, stopped = "", False
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out += text
        if stopped:
            break
    whole = "".join(chunks)
    cut = first_stop(whole, stops)
    if cut is not None:
        assert stopped and out == whole[:cut]
    else:
        assert not stopped and out + matcher.flush() == whole


def first_stop(text: str, stops: list[str]) -> int | None:
    """The naive reference: where the text is cut for the stop string that ends first (the longest
    of those ending at the same character), or None."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text.endswith(s, 0, end)]
        if ending:
            return end - max(map(len, ending))
    return None


@settings(max_examples=100, deadline=None)
@given(
    chunks=st.lists(st.text(alphabet="ab", max_size=6), max_size=10),
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=5), min_size=1, max_size=12),
)
def test_many_overlapping_stop_strings_match_the_naive_reference(chunks: list[str], stops: list[str]) -> None:
    matcher = StopMatcher(tuple(stops))
    out, stopped, held = "", False, []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out += text
        held.append(matcher.pending)
        if stopped:
            break
    whole = "".join(chunks)
    cut = first_stop(whole, stops)
    assert stopped == (cut is not None)
    assert out == (whole[:cut] if cut is not None else whole[: len(out)])
    if cut is None:  # what is held back is exactly the longest suffix that may begin a stop string
        fed = ""
        for chunk, pending in zip(chunks, held, strict=True):
            fed += chunk
            begins = [n for n in range(1, len(fed) + 1) if any(s.startswith(fed[-n:]) for s in stops)]
            assert len(pending) == max(begins, default=0)


class CountingAutomaton(StopAutomaton):
    """Counts the transitions it follows (trie edges and failure links)."""

    steps = 0

    def step(self, state: int, ch: str) -> int:
        while state and ch not in self.goto[state]:
            state, self.steps = self.fail[state], self.steps + 1
        self.steps += 1
        return self.goto[state].get(ch, 0)


def test_stop_matching_cost_does_not_grow_with_the_number_of_stop_strings() -> None:
    """Automaton steps per character stay below two, with 1 or 10,000 stop strings."""
    text = "0123456789zzz" * 400
    for stops in (("zzzq",), tuple(f"{i:05d}q" for i in range(10_000))):
        matcher = StopMatcher(stops)
        matcher.automaton = automaton = CountingAutomaton(stops)
        automaton.steps = 0  # building it stepped too
        for i in range(0, len(text), 3):
            assert not matcher.feed(text[i : i + 3])[1]
        assert automaton.steps < 2 * len(text)
