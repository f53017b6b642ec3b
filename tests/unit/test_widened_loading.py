"""Loading bf16 weights for fp32 math (`matmul_weights=torch.bfloat16`, the AVX2 hosts' choice): which
weights stay bf16, which do not, and that every role (whole model, attention side, expert rank,
rebalanced experts) holds them alike. The numbers are checked in test_model_parity.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moeserve.workers.kernels.widen_gemm import WidenedLinear
from moeserve.workers.model.loader import load_attention_side, load_experts, load_model
from moeserve.workers.model.random_checkpoint import PRESETS, write_random_checkpoint
from moeserve.workers.parallel.rebalance import _rebuilt

pytestmark = pytest.mark.unit
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("widen") / "tiny", PRESETS["tiny"], BF16)


def _widened_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, WidenedLinear)}


def test_every_linear_but_wkv_b_stays_bf16_and_the_rest_is_fp32(tiny_bf16: Path) -> None:
    model = load_model(tiny_bf16, torch.float32, matmul_weights=BF16)
    plain = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    assert plain == {f"layers.{i}.attn.wkv_b" for i in range(len(model.layers))}  # split per head
    assert "head" in _widened_names(model) and "layers.0.attn.wo" in _widened_names(model)
    widened = _widened_names(model)
    for name, p in model.named_parameters():
        module, _, kind = name.rpartition(".")
        bf16 = ".ffn.experts." in name or (module in widened and kind == "weight")
        assert p.dtype == (BF16 if bf16 else torch.float32), name  # norms, router, embedding: fp32
    fused = model.layers[0].attn._fused_input
    assert fused is not None and fused.dtype == BF16  # q and kv-down read in one product


def test_the_policy_keeps_fp32_weights_on_this_hosts_native_path(tiny_bf16: Path) -> None:
    """No `matmul_weights`: `dtype_policy.matmul_weight_dtype` decides (bf16 only without native
    bf16); an explicit fp32 always gives fp32 weights."""
    from moeserve.workers.kernels.cpu_capability import cpu_capability

    model = load_model(tiny_bf16, torch.float32)
    assert bool(_widened_names(model)) == (not cpu_capability().native_bf16)
    assert not _widened_names(load_model(tiny_bf16, torch.float32, matmul_weights=torch.float32))


def test_only_bf16_checkpoint_tensors_are_kept_bf16(tiny_bf16: Path, tmp_path: Path) -> None:
    """A tensor stored in fp32 is never narrowed; bf16 ones beside it still are."""
    out = tmp_path / "mixed"
    shutil.copytree(tiny_bf16, out)
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors[
        "model.layers.0.self_attn.o_proj.weight"
    ].float()
    first_expert = next(n for n in tensors if ".mlp.experts.0.gate_proj" in n)
    tensors[first_expert] = tensors[first_expert].float()
    save_file(tensors, out / "model.safetensors")
    model = load_model(out, torch.float32, matmul_weights=BF16)
    assert (
        type(model.layers[0].attn.wo) is nn.Linear and model.layers[0].attn.wo.weight.dtype == torch.float32
    )
    assert isinstance(model.layers[1].attn.wo, WidenedLinear)
    layer = int(first_expert.split(".")[2])
    assert not model.layers[layer].ffn.experts.widened  # one stacked tensor: all bf16 or none


def test_a_tied_head_stays_the_fp32_embedding(tiny_bf16: Path, tmp_path: Path) -> None:
    out = tmp_path / "tied"
    shutil.copytree(tiny_bf16, out)
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(out / "model.safetensors")
    tensors.pop("lm_head.weight")
    save_file(tensors, out / "model.safetensors")
    model = load_model(out, torch.float32, matmul_weights=BF16)
    assert model.head.weight is model.embed.weight and model.head.weight.dtype == torch.float32


def test_attention_side_and_expert_ranks_hold_the_same_weights(tiny_bf16: Path) -> None:
    whole = load_model(tiny_bf16, torch.float32, matmul_weights=BF16)
    attention = load_attention_side(tiny_bf16, torch.float32, matmul_weights=BF16)
    assert _widened_names(attention) == _widened_names(whole)
    experts = load_experts(tiny_bf16, [1, 3], torch.float32, matmul_weights=BF16)
    for layer, module in experts.items():
        full = whole.local_experts()[layer]
        assert module.widened and module.dtype == torch.float32 and module.weight_dtype == BF16
        assert torch.equal(module.w13[1], full.w13[3]) and torch.equal(module.w2[0], full.w2[1])
        moved = _rebuilt(module, [3, 5], {(layer, 5): _bytes_of(full, 5)}, layer)
        assert moved.widened and moved.w13.dtype == BF16
        assert torch.equal(moved.w13[0], full.w13[3]) and torch.equal(moved.w2[1], full.w2[5])


def _bytes_of(module, expert: int) -> torch.Tensor:
    i = module.expert_ids.index(expert)
    return torch.cat([p.detach()[i].contiguous().view(-1).view(torch.uint8) for p in module.parameters()])


def test_only_bf16_under_fp32_is_accepted(tiny_bf16: Path) -> None:
    with pytest.raises(ValueError, match="only bf16 under fp32 is widened"):
        load_model(tiny_bf16, BF16, matmul_weights=torch.float32)
    with pytest.raises(ValueError, match="only bf16 under fp32 is widened"):
        load_model(tiny_bf16, torch.float32, matmul_weights=torch.float16)
