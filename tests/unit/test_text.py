"""Streaming text: incremental detokenization never splits a character; stop strings match across
token boundaries and text that may begin one is held back."""

from __future__ import annotations

import pytest
from builders import train_byte_level_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.workers.engine.text import REPLACEMENT, IncrementalDetokenizer, StopMatcher, TextStream
from moeserve.workers.tokenizer import Tokenizer

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
    hits = [i for s in stops if (i := whole.find(s)) >= 0]
    if hits:
        assert stopped and out == whole[: min(hits)]
    else:
        assert not stopped and out + matcher.flush() == whole
