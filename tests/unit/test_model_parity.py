"""The model matches transformers' DeepseekV2/V3ForCausalLM on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import prefill_logits

from moeserve.workers.kernels.widen_gemm import WidenedLinear
from moeserve.workers.model.batch import ForwardBatch, SequenceStep
from moeserve.workers.model.loader import load_model
from moeserve.workers.offline.generate import GenerationSettings, generate, make_cache

pytestmark = pytest.mark.unit
NAMES = ["v2_lite", "v2", "v3"]


def prompt(n: int, seed: int = 1, vocab: int = 256) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", NAMES + ["v2_sharded"])
def test_fp32_prefill_logits_match_transformers(name: str, reference_checkpoints, reference_models) -> None:
    ours = load_model(reference_checkpoints[name])
    ref_model = reference_models[name.removesuffix("_sharded")]
    ids = prompt(48)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    got = prefill_logits(ours, ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_sharded_checkpoint_really_has_shards(reference_checkpoints) -> None:
    shards = list(Path(reference_checkpoints["v2_sharded"]).glob("model-*.safetensors"))
    assert len(shards) > 1
    assert (Path(reference_checkpoints["v2_sharded"]) / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("name", NAMES)
def test_32_greedy_tokens_identical_to_transformers(
    name: str, reference_checkpoints, reference_models
) -> None:
    ours = load_model(reference_checkpoints[name])
    ids = prompt(20, seed=2)
    with torch.no_grad():
        ref = (
            reference_models[name]
            .generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[
                0, len(ids) :
            ]
            .tolist()
        )
    got = generate(ours, [ids], GenerationSettings(max_tokens=32, stop_at_eos=False))[0]
    assert got == ref


@pytest.mark.parametrize("name", NAMES)
def test_absorbed_decode_matches_naive_prefill_at_every_position(name: str, reference_checkpoints) -> None:
    model = load_model(reference_checkpoints[name])
    ids = prompt(40, seed=3)
    naive = prefill_logits(model, ids)  # [40, V], naive MLA
    block_size = 4  # several blocks, so the paging is exercised
    cache = make_cache(model, [len(ids)], block_size)
    seq = cache.new_sequence()
    decoded = []
    for pos, token in enumerate(ids):
        seq.reserve(cache.allocator, 1)
        batch = ForwardBatch.build([SequenceStep([token], pos, seq.blocks)], block_size)
        assert batch.decode_rows.numel() == 1  # the absorbed path runs
        decoded.append(model(batch, cache)[0])
        seq.num_tokens += 1
    assert torch.allclose(torch.stack(decoded), naive, atol=1e-4, rtol=1e-4)


def test_batched_decode_of_uneven_sequences_matches_one_at_a_time(reference_checkpoints) -> None:
    model = load_model(reference_checkpoints["v2"])
    prompts = [prompt(n, seed=n) for n in (5, 17, 33)]
    together = generate(model, prompts, GenerationSettings(max_tokens=12, stop_at_eos=False))
    alone = [generate(model, [p], GenerationSettings(max_tokens=12, stop_at_eos=False))[0] for p in prompts]
    assert together == alone


def test_chunked_prefill_matches_whole_prefill(reference_checkpoints) -> None:
    model = load_model(reference_checkpoints["v3"])
    ids = prompt(30, seed=4)
    whole = prefill_logits(model, ids)
    cache = make_cache(model, [len(ids)], 8)
    seq = cache.new_sequence()
    chunks = []
    for start in range(0, 30, 7):
        chunk = ids[start : start + 7]
        seq.reserve(cache.allocator, len(chunk))
        batch = ForwardBatch.build([SequenceStep(chunk, start, seq.blocks)], 8)
        chunks.append(model(batch, cache, all_logits=True))
        seq.num_tokens += len(chunk)
    assert torch.allclose(torch.cat(chunks), whole, atol=1e-4, rtol=1e-4)


def test_bf16_top1_agrees_with_fp32_on_256_token_prompt(reference_checkpoints) -> None:
    path = reference_checkpoints["v2"]
    ids = prompt(256, seed=5)
    fp32 = prefill_logits(load_model(path, torch.float32), ids).argmax(-1)
    bf16 = prefill_logits(load_model(path, torch.bfloat16), ids).argmax(-1)
    assert (fp32 == bf16).float().mean() >= 0.95


@pytest.mark.parametrize("name", ["v2_lite", "v2"])  # wq + wkv_a, and wq_a + wkv_a
def test_fused_input_projections_equal_separate_ones(name: str, reference_checkpoints) -> None:
    model = load_model(reference_checkpoints[name])
    assert all(getattr(b.attn, "_fused_input", None) is not None for b in model.layers)
    ids = prompt(24, seed=6)
    fused = prefill_logits(model, ids)
    for block in model.layers:
        block.attn._fused_input = None  # the reference: two matmuls
    assert torch.allclose(prefill_logits(model, ids), fused, atol=1e-5, rtol=1e-5)


# -- bf16 checkpoints computed in fp32 with the weights kept bf16 (the AVX2 hosts' choice) --------


def _widened(path: Path) -> torch.nn.Module:
    model = load_model(path, torch.float32, matmul_weights=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, WidenedLinear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(e.widened and e.w13.dtype == torch.bfloat16 for e in model.local_experts().values())
    assert model.dtype == torch.float32  # activations, cache and the absorbed MLA weights
    return model


@pytest.mark.parametrize("name", NAMES)
def test_widened_bf16_weights_match_transformers_in_fp32(name: str, bf16_references) -> None:
    path, ref_model = bf16_references[name]
    ours = _widened(path)
    ids = prompt(48)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    got = prefill_logits(ours, ids)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()  # fp32 math on the same values
    plain = prefill_logits(load_model(path, torch.float32, matmul_weights=torch.float32), ids)
    assert torch.allclose(got, plain, atol=1e-5, rtol=1e-5)
    short = prompt(20, seed=2)
    with torch.no_grad():
        want = ref_model.generate(
            torch.tensor([short]), max_new_tokens=32, min_new_tokens=32, do_sample=False
        )[0, len(short) :].tolist()
    assert generate(ours, [short], GenerationSettings(max_tokens=32, stop_at_eos=False))[0] == want


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_widened_absorbed_decode_matches_naive_prefill(name: str, bf16_references) -> None:
    model = _widened(bf16_references[name][0])
    ids = prompt(24, seed=3)
    naive = prefill_logits(model, ids)
    cache = make_cache(model, [len(ids)], 4)
    seq = cache.new_sequence()
    decoded = []
    for pos, token in enumerate(ids):
        seq.reserve(cache.allocator, 1)
        decoded.append(model(ForwardBatch.build([SequenceStep([token], pos, seq.blocks)], 4), cache)[0])
        seq.num_tokens += 1
    assert torch.allclose(torch.stack(decoded), naive, atol=1e-4, rtol=1e-4)
    assert all(block.attn._widened_absorbed_weights() is not None for block in model.layers)  # bf16 W_UK/W_UV


def test_widened_batched_decode_equals_one_at_a_time_bit_for_bit(bf16_references) -> None:
    """The kernel sums each output in one order whatever the batch: batched tokens are the lone ones."""
    model = _widened(bf16_references["v2"][0])
    prompts = [prompt(n, seed=n) for n in (5, 17, 33)]
    settings = GenerationSettings(max_tokens=12, stop_at_eos=False)
    together = generate(model, prompts, settings)
    assert together == [generate(model, [p], settings)[0] for p in prompts]
