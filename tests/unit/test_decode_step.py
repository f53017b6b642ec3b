"""The static decode step (what CUDA graphs capture) on the CPU: it equals the eager decode and the
naive path, compiles with torch.compile(fullgraph=True) (no host sync, no data-dependent branch),
and the graph decoder's buckets and padding change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeserve.workers.model.batch import ForwardBatch, SequenceStep
from moeserve.workers.model.cuda_graphs import CudaGraphDecoder, buckets_up_to
from moeserve.workers.model.kv_cache import PagedLatentCache, SequenceBlocks
from moeserve.workers.model.loader import load_model
from moeserve.workers.model.transformer import Transformer
from moeserve.workers.offline.generate import make_cache

pytestmark = pytest.mark.unit

BLOCK = 4  # several blocks per sequence, so the paging is exercised


def prefilled(
    model: Transformer, lengths: list[int], spare: int = 4
) -> tuple[PagedLatentCache, list[SequenceBlocks]]:
    """A cache holding random prompts of these lengths, one block of room past each."""
    cache = make_cache(model, [n + spare for n in lengths], BLOCK)
    seqs = [cache.new_sequence() for _ in lengths]
    gen = torch.Generator().manual_seed(sum(lengths))
    steps = []
    for seq, n in zip(seqs, lengths, strict=True):
        seq.reserve(cache.allocator, n)
        steps.append(SequenceStep(torch.randint(2, 200, (n,), generator=gen).tolist(), 0, seq.blocks))
    model(ForwardBatch.build(steps, BLOCK), cache)
    for seq, n in zip(seqs, lengths, strict=True):
        seq.num_tokens = n
        seq.reserve(cache.allocator, 1)
    return cache, seqs


def decode_batch(seqs: list[SequenceBlocks], tokens: list[int]) -> ForwardBatch:
    return ForwardBatch.build(
        [SequenceStep([t], s.num_tokens, s.blocks) for s, t in zip(seqs, tokens, strict=True)], BLOCK
    )


def run_restoring(cache: PagedLatentCache, step: object) -> torch.Tensor:
    """Run a step that writes the cache, then put the cache back, so the next one sees the same."""
    saved = [layer.clone() for layer in cache.layers]
    assert callable(step)
    with torch.no_grad():
        out = step()
    for layer, old in zip(cache.layers, saved, strict=True):
        layer.copy_(old)
    return out


def model_for(path: Path, dtype: torch.dtype) -> Transformer:
    model = load_model(path, dtype)
    model.prepare_decode()
    return model


@pytest.mark.parametrize("name", ["v2", "v3"])  # YaRN + q LoRA + group-limited routing; noaux_tc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decode_equals_eager_decode_and_naive(
    name: str, dtype: torch.dtype, reference_checkpoints
) -> None:
    model = model_for(reference_checkpoints[name], dtype)
    cache, seqs = prefilled(model, [5, 12, 1, 9])  # contexts not multiples of the block size, one of 2
    batch = decode_batch(seqs, [3, 5, 7, 11])
    eager = run_restoring(cache, lambda: model(batch, cache))
    static = run_restoring(cache, lambda: model.forward_decode(batch.decode_inputs(), cache, splits=2))
    model.attn_impl = "naive"
    naive = run_restoring(cache, lambda: model(batch, cache))
    tol = 1e-4 if dtype == torch.float32 else 0.05
    scale = naive.abs().max()
    assert (static - eager).abs().max() <= tol * scale
    assert (static - naive).abs().max() <= tol * scale


def test_static_decode_compiles_as_one_graph(reference_checkpoints) -> None:
    """fullgraph=True turns any graph break (a host sync such as .tolist(), a data-dependent
    branch) into an error. The eager grouped experts path, which syncs, is the control."""
    model = model_for(reference_checkpoints["v2"], torch.float32)
    cache, seqs = prefilled(model, [6, 3])
    batch = decode_batch(seqs, [4, 9])
    expected = run_restoring(cache, lambda: model.forward_decode(batch.decode_inputs(), cache))
    torch._dynamo.reset()
    compiled = torch.compile(model.forward_decode, fullgraph=True, backend="eager")
    got = run_restoring(cache, lambda: compiled(batch.decode_inputs(), cache))
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    executor = model.local_executor()
    layer = model.config.moe_layers[0]
    syncing = torch.compile(lambda x, i, w: executor(layer, x, i, w), fullgraph=True, backend="eager")
    x = torch.randn(3, model.config.hidden_size)
    ids = torch.tensor([[0, 1], [1, 2], [3, 4]])
    with pytest.raises(Exception, match="data-dependent"), torch.no_grad():
        syncing(x, ids, torch.rand(3, 2))


def test_buckets_pad_without_changing_results(reference_checkpoints) -> None:
    model = model_for(reference_checkpoints["v2"], torch.float32)
    cache, seqs = prefilled(model, [7, 2, 13])
    decoder = CudaGraphDecoder(model, cache, max_batch=8, max_context=32, buckets=(2, 4, 8))
    assert decoder.bucket_for(3) == 4 and decoder.bucket_for(9) is None
    batch = decode_batch(seqs, [5, 6, 8])
    eager = run_restoring(cache, lambda: model(batch, cache))
    padded = run_restoring(cache, lambda: decoder.decode(batch))  # 3 rows in bucket 4
    assert padded is not None and padded.shape == eager.shape
    assert torch.allclose(padded, eager, atol=1e-4, rtol=1e-4)
    one = run_restoring(cache, lambda: decoder.decode(decode_batch(seqs[:1], [5])))  # bucket 2
    assert one is not None and torch.allclose(one, eager[:1], atol=1e-4, rtol=1e-4)


def test_steps_a_graph_cannot_take_stay_eager(reference_checkpoints) -> None:
    model = model_for(reference_checkpoints["v2"], torch.float32)
    cache, seqs = prefilled(model, [7, 2, 13])
    decoder = CudaGraphDecoder(model, cache, max_batch=2, max_context=12)
    assert decoder.decode(decode_batch(seqs, [1, 2, 3])) is None  # more sequences than the largest bucket
    assert decoder.decode(decode_batch(seqs[2:], [1])) is None  # context past max_context
    prefill = ForwardBatch.build([SequenceStep([1], seqs[0].num_tokens, seqs[0].blocks),
                                  SequenceStep([1, 2], 0, seqs[1].blocks)], BLOCK)  # fmt: skip
    assert decoder.decode(prefill) is None


def test_default_buckets() -> None:
    assert buckets_up_to(1) == (1,)
    assert buckets_up_to(20) == (1, 2, 4, 8, 16, 20)
    assert buckets_up_to(256)[-3:] == (192, 224, 256)
