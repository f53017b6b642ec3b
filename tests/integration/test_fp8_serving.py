"""An FP8 checkpoint served with its weights kept fp8 (`--fp8-weights keep`, issue 19): the single-process
server and the expert-parallel one (1 attention + 2 expert ranks) hold fp8 weights and stream the greedy
tokens the offline path generates from the same kept weights; the offline expert-parallel ranks hold
far fewer weight bytes than with the weights dequantized, and generate the same tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moeserve.workers.client import InferenceClient, build_request
from moeserve.workers.engine import EngineSettings
from moeserve.workers.model.loader import load_model
from moeserve.workers.model.quantize_fp8 import quantize_checkpoint
from moeserve.workers.offline.generate import GenerationSettings, generate
from moeserve.workers.offline.local_world import launch_local
from moeserve.workers.offline.rank import Run
from moeserve.workers.parallel.settings import EPSettings
from moeserve.workers.server.app import BackgroundServer, local_loader
from moeserve.workers.server.local_ranks import ep_loader

pytestmark = pytest.mark.integration
SETTINGS = EngineSettings(max_model_len=128, max_num_batched_tokens=64, kv_cache_tokens=2048)
PROMPTS = [[5, 6, 7, 8], [40, 41], [9, 100, 101, 102, 103, 104]]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def fp8_checkpoint(serving_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_checkpoint(serving_checkpoint, tmp_path_factory.mktemp("fp8") / "tiny-v2-fp8")


@pytest.fixture(scope="module")
def kept_tokens(fp8_checkpoint: Path) -> list[list[int]]:
    """The offline path's greedy tokens with the weights kept fp8 (the oracle)."""
    model = load_model(fp8_checkpoint, torch.float32, fp8_weights="keep")
    assert any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    return generate(model, PROMPTS, GenerationSettings(max_tokens=MAX_TOKENS, stop_at_eos=False))


def served_tokens(loader: Callable) -> list[list[int]]:
    with BackgroundServer(loader, metrics=False) as server, InferenceClient(server.address) as client:
        done = [
            client.generate(
                build_request(prompt_token_ids=p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            )
            for p in PROMPTS
        ]
        return [list(d.token_ids) for d in done]


def test_single_process_server_keeps_fp8_weights(fp8_checkpoint: Path, kept_tokens: list[list[int]]) -> None:
    loaded: list[torch.nn.Module] = []
    inner = local_loader(fp8_checkpoint, torch.float32, SETTINGS, "keep")

    def loader(metrics, on_failure):  # records the model the engine runs
        backend = inner(metrics, on_failure)
        loaded.append(backend.loop.engine.runner.model)  # type: ignore[attr-defined]
        return backend

    assert served_tokens(loader) == kept_tokens
    fp8_bytes = sum(p.numel() for p in loaded[0].parameters() if p.dtype == torch.float8_e4m3fn)
    assert fp8_bytes > 0.5 * sum(p.numel() for p in loaded[0].parameters())


def test_expert_parallel_server_with_kept_weights_streams_the_same_tokens(
    fp8_checkpoint: Path, kept_tokens: list[list[int]]
) -> None:
    ep = EPSettings(1, 2, collective_timeout_s=60.0, fp8_weights="keep", block_size=SETTINGS.block_size)
    assert served_tokens(ep_loader(fp8_checkpoint, torch.float32, SETTINGS, ep)) == kept_tokens


def test_expert_parallel_ranks_hold_fp8_weights(fp8_checkpoint: Path) -> None:
    generation = GenerationSettings(max_tokens=MAX_TOKENS)
    results = {
        mode: launch_local(
            fp8_checkpoint, EPSettings(1, 2, 60.0, fp8_weights=mode), [Run((PROMPTS,), generation)]
        )
        for mode in ("dequantize", "keep")
    }
    assert results["keep"][0].token_ids[0] == results["dequantize"][0].token_ids[0]
    kept = [r.weight_bytes for r in results["keep"]]
    dequantized = [r.weight_bytes for r in results["dequantize"]]
    # fp8 matrices take 1 byte per weight instead of fp32's 4 (block scales are small); the attention
    # rank also holds the embedding and LM head, which stay unquantized, as the published format has it
    assert kept[0] < 0.7 * dequantized[0], (kept, dequantized)
    assert all(k < 0.3 * d for k, d in zip(kept[1:], dequantized[1:], strict=True)), (kept, dequantized)
