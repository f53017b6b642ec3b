"""CUDA graphs of the decode step and the fused kernels in the model, on a GPU. Skipped without one."""

from __future__ import annotations

import pytest
import torch

from moeserve.workers.model.batch import ForwardBatch, SequenceStep
from moeserve.workers.model.cuda_graphs import CudaGraphDecoder
from moeserve.workers.model.loader import load_model
from moeserve.workers.offline.generate import GenerationSettings, generate, make_cache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replays_equal_eager_steps(dtype: torch.dtype, reference_checkpoints) -> None:
    """Several decode steps of 3 sequences (bucket 4, one padding row): each replay, with new
    inputs in the same buffers, gives the eager step's logits."""
    model = load_model(reference_checkpoints["v2"], dtype, device="cuda")
    lengths, block = [7, 2, 13], 4
    caches = [make_cache(model, [n + 8 for n in lengths], block) for _ in range(2)]
    seqs = [[c.new_sequence() for _ in lengths] for c in caches]
    prompts = [list(range(3, 3 + n)) for n in lengths]
    for cache, ss in zip(caches, seqs, strict=True):
        steps = []
        for s, p in zip(ss, prompts, strict=True):
            s.reserve(cache.allocator, len(p))
            steps.append(SequenceStep(p, 0, s.blocks))
        model(ForwardBatch.build(steps, block, "cuda"), cache)
        for s, p in zip(ss, prompts, strict=True):
            s.num_tokens = len(p)
    decoder = CudaGraphDecoder(model, caches[1], max_batch=4, max_context=32)
    tokens = [5, 6, 8]
    for _ in range(4):
        got = []
        for cache, ss in zip(caches, seqs, strict=True):
            for s in ss:
                s.reserve(cache.allocator, 1)
            batch = ForwardBatch.build(
                [SequenceStep([t], s.num_tokens, s.blocks) for s, t in zip(ss, tokens, strict=True)],
                block,
                "cuda",
            )
            got.append(model(batch, cache) if cache is caches[0] else decoder.decode(batch))
            for s in ss:
                s.num_tokens += 1
        eager, graphed = got
        assert graphed is not None
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        assert (graphed - eager).abs().max() <= tol * eager.abs().max()
        tokens = eager.argmax(-1).tolist()


def test_graphs_and_enforce_eager_generate_the_same_tokens(reference_checkpoints) -> None:
    model = load_model(reference_checkpoints["v3"], device="cuda")
    prompts = [[1, 2, 3, 4], [9, 8, 7], [5] * 11]
    settings = GenerationSettings(max_tokens=12, stop_at_eos=False)
    assert generate(model, prompts, settings) == generate(model, prompts, settings, enforce_eager=True)
