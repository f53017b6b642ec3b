"""The MTP layer (DeepSeek-V3 multi-token prediction) against a naive reference of its equations.

The reference: transformers' DeepseekV3 for the main model (final-normed hidden states h_i) and for
the MTP decoder block (a one-layer DeepseekV3Model whose final norm is the shared head's norm), with
the layer's own equations written out here:
    h'_i = Block(eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)])),  logits_i = head(shared_norm(h'_i)).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moeserve.workers.engine.runner import LocalModelRunner
from moeserve.workers.model import fp8
from moeserve.workers.model.batch import SequenceStep
from moeserve.workers.model.loader import SCALE_SUFFIX, CheckpointError, load_model
from moeserve.workers.model.mtp import load_mtp
from moeserve.workers.model.quantize_fp8 import quantize_checkpoint
from tests.builders import REFERENCE_CONFIGS, reference_model

pytestmark = pytest.mark.unit
MTP_LAYER = 4  # the v3 reference has 4 layers


def _mtp_block_model() -> torch.nn.Module:
    """A one-layer DeepseekV3Model: layer 0 is the MTP block (MoE, as layer 4 is), norm = shared head norm."""
    import transformers

    _, kwargs = REFERENCE_CONFIGS["v3"]
    config = transformers.DeepseekV3Config(**{**kwargs, "num_hidden_layers": 1, "first_k_dense_replace": 0})
    torch.manual_seed(1)
    block = transformers.DeepseekV3Model(config)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.05)
        for name, b in block.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.05)
    return block.eval()


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """The v3 reference checkpoint plus an MTP layer 4 as DeepSeek-V3 publishes it."""
    root = tmp_path_factory.mktemp("mtp")
    main = reference_model("v3")
    main.save_pretrained(root / "ckpt")
    block = _mtp_block_model()
    block.save_pretrained(root / "block")
    torch.manual_seed(2)
    d = main.config.hidden_size
    extra = {
        "enorm.weight": torch.randn(d) * 0.1 + 1.0,
        "hnorm.weight": torch.randn(d) * 0.1 + 1.0,
        "eh_proj.weight": torch.randn(d, 2 * d) * 0.05,
        "embed_tokens.weight": main.model.embed_tokens.weight.detach().clone(),
        "shared_head.head.weight": main.lm_head.weight.detach().clone(),
    }
    for name, t in load_file(str(root / "block" / "model.safetensors")).items():
        name = name.removeprefix("model.")
        if name.startswith("layers.0."):
            extra[name.removeprefix("layers.0.")] = t
        elif name == "norm.weight":
            extra["shared_head.norm.weight"] = t
    tensors = load_file(str(root / "ckpt" / "model.safetensors"))
    tensors.update({f"model.layers.{MTP_LAYER}.{k}": v.contiguous() for k, v in extra.items()})
    save_file(tensors, str(root / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((root / "ckpt" / "config.json").read_text())
    (root / "ckpt" / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return root / "ckpt", {"main": main, "block": block, **extra}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_mtp_logits(ref: dict, ids: list[int]) -> torch.Tensor:
    """Logits [T-1, V] of the MTP layer at positions 0..T-2 (predicting t_{i+2})."""
    main, block = ref["main"], ref["block"]
    x = torch.tensor([ids])
    with torch.no_grad():
        h = main.model(input_ids=x).last_hidden_state[0]  # [T, D], after the final norm
        e = _rms(F.embedding(x[0, 1:], ref["embed_tokens.weight"]), ref["enorm.weight"])  # emb(t_{i+1})
        hn = _rms(h[:-1], ref["hnorm.weight"])
        inputs = torch.cat([e, hn], dim=-1) @ ref["eh_proj.weight"].T  # [T-1, D]
        out = block(inputs_embeds=inputs[None]).last_hidden_state[0]  # block, then the shared norm
        return out @ ref["shared_head.head.weight"].T


def test_mtp_logits_match_the_reference(mtp_checkpoint) -> None:
    path, ref = mtp_checkpoint
    model = load_model(path)
    mtp = load_mtp(path, model)
    assert mtp.embed.weight is model.embed.weight and mtp.head.weight is model.head.weight  # equal copies
    ids = torch.randint(
        0, model.config.vocab_size, (13,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    expected = reference_mtp_logits(ref, ids)
    runner = LocalModelRunner(model, 16, 4, mtp=mtp)
    blocks = [runner.allocator.allocate() for _ in range(4)]
    hidden = runner.step_hidden([SequenceStep(ids, 0, blocks)])  # [T, D]
    # the MTP layer at once (prefill path), then again in pieces through its cache: a chunk, a
    # speculative-verify chunk (absorbed path per token), single tokens
    whole = runner.mtp_logits(runner.mtp_step([SequenceStep(ids[1:], 0, blocks)], hidden[:-1]))
    torch.testing.assert_close(whole, expected, atol=2e-4, rtol=1e-4)
    pieces = []
    for start, end, each in ((0, 5, False), (5, 8, True), (8, 9, False), (9, 12, False)):
        step = SequenceStep(ids[start + 1 : end + 1], start, blocks, decode_each=each)
        pieces.append(runner.mtp_logits(runner.mtp_step([step], hidden[start:end])))
    torch.testing.assert_close(torch.cat(pieces), expected, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(whole, runner.head_logits(hidden[:-1]), atol=1e-2)  # not the main head's


def test_a_checkpoint_without_an_mtp_layer_is_refused(reference_checkpoints) -> None:
    model = load_model(reference_checkpoints["v3"])
    with pytest.raises(CheckpointError, match="no MTP layer"):
        load_mtp(reference_checkpoints["v3"], model)


def test_a_missing_mtp_tensor_is_named(mtp_checkpoint, tmp_path: Path) -> None:
    path, _ = mtp_checkpoint
    for missing, message in (
        ("hnorm.weight", r"missing MTP tensor\(s\) for: hnorm.weight"),
        ("mlp.experts.3.up_proj.weight", r"routed expert 3 \(w13\[1/2\]\) of MTP layer 4"),
        ("self_attn.kv_b_proj.weight", r"missing MTP tensor\(s\) for: block.attn.wkv_b.weight"),
    ):
        tensors = load_file(str(path / "model.safetensors"))
        del tensors[f"model.layers.{MTP_LAYER}.{missing}"]
        out = tmp_path / missing
        out.mkdir()
        save_file(tensors, str(out / "model.safetensors"))
        (out / "config.json").write_text((path / "config.json").read_text())
        with pytest.raises(CheckpointError, match=message):
            load_mtp(out, load_model(out))


def _dequantized_copy(src: Path, out: Path) -> Path:
    """`src` (fp8 block-scaled) with every fp8 weight dequantized to fp32, as a plain checkpoint."""
    out.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    plain = {
        name: fp8.dequantize(fp8.BlockFp8(t, tensors[name + SCALE_SUFFIX], block))
        if t.dtype == fp8.FP8
        else t
        for name, t in tensors.items()
        if not name.endswith(SCALE_SUFFIX)
    }
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_an_fp8_checkpoints_mtp_layer_loads_dequantized(mtp_checkpoint, tmp_path: Path) -> None:
    """quantize-fp8 stores the MTP layer's linear weights as fp8 blocks, as DeepSeek-V3 publishes
    them: its logits equal those of the same layer with the weights dequantized beforehand."""
    path, _ = mtp_checkpoint
    quantized = quantize_checkpoint(path, tmp_path / "fp8")
    names = load_file(str(quantized / "model.safetensors"))
    scaled = f"model.layers.{MTP_LAYER}.mlp.experts.0.down_proj.weight"
    assert names[scaled].dtype == fp8.FP8 and scaled + SCALE_SUFFIX in names
    assert names[f"model.layers.{MTP_LAYER}.self_attn.kv_a_proj_with_mqa.weight"].dtype == fp8.FP8
    plain = _dequantized_copy(quantized, tmp_path / "plain")
    ids = torch.randint(0, 100, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    logits = []
    for checkpoint in (quantized, plain):
        model = load_model(checkpoint)
        runner = LocalModelRunner(model, 16, 4, mtp=load_mtp(checkpoint, model))
        blocks = [runner.allocator.allocate() for _ in range(3)]  # 9 tokens in blocks of 4
        hidden = runner.step_hidden([SequenceStep(ids, 0, blocks)])
        logits.append(runner.mtp_logits(runner.mtp_step([SequenceStep(ids[1:], 0, blocks)], hidden[:-1])))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)

    # a scale missing from the MTP layer is named
    tensors = dict(names)
    del tensors[scaled + SCALE_SUFFIX]
    save_file(tensors, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"'{scaled}' has no block scales"):
        load_mtp(quantized, load_model(quantized))
