"""The model on a CUDA device matches the CPU model and transformers. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from builders import prefill_logits

from moeserve.workers.model.loader import load_model
from moeserve.workers.offline.generate import GenerationSettings, generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("name", ["v2_lite", "v2", "v3"])
def test_cuda_fp32_logits_match_transformers(name: str, reference_checkpoints, reference_models) -> None:
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference_models[name](ids).logits[0].float()
    model = load_model(reference_checkpoints[name], torch.float32, device="cuda")
    got = prefill_logits(model, ids[0].tolist()).cpu()
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_cuda_greedy_tokens_match_cpu(reference_checkpoints) -> None:
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    settings = GenerationSettings(max_tokens=16, stop_at_eos=False)
    cpu = generate(load_model(reference_checkpoints["v2"]), prompts, settings)
    gpu = generate(load_model(reference_checkpoints["v2"], device="cuda"), prompts, settings)
    assert gpu == cpu
