"""Fixtures for serving tests: checkpoints with a tokenizer, servers on localhost, metric scraping."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from builders import write_scripted_checkpoint, write_serving_checkpoint

from moeserve.workers.client import InferenceClient
from moeserve.workers.engine import EngineSettings
from moeserve.workers.model.tokenizer import Tokenizer
from moeserve.workers.server.app import BackgroundServer, local_loader

# What the scripted model says after its first token, then EOS: multi-byte characters split across tokens.
SCRIPT = "Grüße日本語 🙂café naïve"
MAIN_SETTINGS = EngineSettings(max_model_len=256, max_num_batched_tokens=128, kv_cache_tokens=8192)


@pytest.fixture(scope="session")
def serving_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_serving_checkpoint(tmp_path_factory.mktemp("serving") / "tiny-v2")


@pytest.fixture(scope="session")
def scripted_checkpoint(serving_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = Tokenizer.from_model_dir(serving_checkpoint)
    assert tokenizer is not None
    chain = tokenizer.encode(SCRIPT) + [1]  # ... then EOS (id 1)
    return write_scripted_checkpoint(serving_checkpoint, tmp_path_factory.mktemp("scripted") / "echo", chain)


@pytest.fixture(scope="module")
def server(serving_checkpoint: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(local_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS)) as s:
        yield s


@pytest.fixture()
def client(server: BackgroundServer) -> Iterator[InferenceClient]:
    with InferenceClient(server.address) as c:
        yield c
