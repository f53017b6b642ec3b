"""An FP8 checkpoint kept fp8 on a CUDA device (Triton block-fp8 GEMMs, fused MoE with fp8 experts)
computes what the CPU computes from the same weights dequantized at load. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import prefill_logits

from moeserve.workers.model.loader import load_model
from moeserve.workers.model.quantize_fp8 import quantize_checkpoint
from moeserve.workers.offline.generate import GenerationSettings, generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_fp8_kept_logits_and_greedy_tokens_match_cpu_dequantized(
    reference_checkpoints, tmp_path: Path
) -> None:
    path = quantize_checkpoint(reference_checkpoints["v3"], tmp_path / "v3-fp8")  # hidden 64: partial blocks
    cpu = load_model(path, torch.float32, fp8_weights="dequantize")
    gpu = load_model(path, torch.float32, device="cuda", fp8_weights="keep")
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    want, got = prefill_logits(cpu, ids), prefill_logits(gpu, ids).cpu()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    settings = GenerationSettings(max_tokens=16, stop_at_eos=False)
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    assert generate(gpu, prompts, settings) == generate(cpu, prompts, settings)
