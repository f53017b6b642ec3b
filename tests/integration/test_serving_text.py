"""Streamed text over gRPC from a scripted model whose output is known: multi-byte characters split
across tokens arrive whole and exact; stop strings match across tokens; text prompts work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import SCRIPT

from moeserve.workers.client import InferenceClient, build_request, gather
from moeserve.workers.engine import EngineSettings
from moeserve.workers.model.tokenizer import Tokenizer
from moeserve.workers.server.app import BackgroundServer, local_loader

pytestmark = pytest.mark.integration
EXPECTED = SCRIPT[2:]  # the first token, "Gr", is the prompt


@pytest.fixture(scope="module")
def echo(scripted_checkpoint: Path) -> Iterator[InferenceClient]:
    loader = local_loader(scripted_checkpoint, torch.float32, EngineSettings(max_model_len=128))
    with BackgroundServer(loader, metrics=False) as server, InferenceClient(server.address) as client:
        yield client


def test_multi_byte_characters_stream_whole_and_exact(
    echo: InferenceClient, scripted_checkpoint: Path
) -> None:
    tokenizer = Tokenizer.from_model_dir(scripted_checkpoint)
    assert tokenizer is not None
    chunks = list(echo.stream(build_request("Gr", max_tokens=64, temperature=0.0)))
    texts = [c.text for c in chunks]
    ids = [t for c in chunks for t in c.token_ids]
    assert "".join(texts) == EXPECTED == tokenizer.decode(ids)
    assert all("\ufffd" not in t for t in texts)
    assert "" in texts[:-1]  # held back while a character was incomplete
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # ... because tokens do split characters
    assert chunks[-1].finish_reason == 1 and ids[-1] == 1  # STOP on EOS, whose id is returned


@pytest.mark.parametrize(
    "stop, max_tokens, text, reason",
    [
        (["語 🙂"], 64, "üße日本", "stop"),  # spans three tokens
        (["🙂", "ß"], 64, "ü", "stop"),  # the earliest of several
        (["naïve!"], 64, EXPECTED, "stop"),  # a prefix held back to the end, then released at EOS
        (["zzz"], 6, "üße日本語", "length"),
        (["zzz"], 4, "üße\ufffd", "length"),  # cut inside a character: flushed as decode() does
    ],
)
def test_stop_strings_match_across_tokens(
    echo: InferenceClient, stop: list[str], max_tokens: int, text: str, reason: str
) -> None:
    done = echo.generate(build_request("Gr", max_tokens=max_tokens, temperature=0.0, stop=stop))
    assert (done.text, done.finish_reason) == (text, reason)


def test_ignore_eos_keeps_generating(echo: InferenceClient) -> None:
    done = echo.generate(build_request("Gr", max_tokens=30, temperature=0.0, ignore_eos=True))
    assert done.finish_reason == "length" and done.completion_tokens == 30
    assert done.text.startswith(EXPECTED)


def test_stream_gathers_to_the_same_completion(echo: InferenceClient) -> None:
    request = build_request("Gr", max_tokens=64, temperature=0.0)
    assert gather(echo.stream(request)).text == echo.generate(request).text
