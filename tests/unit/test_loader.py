"""Checkpoint loading: roles read only their tensors; bad checkpoints are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve.workers.model.loader import (
    CheckpointError,
    CheckpointReader,
    load_attention_side,
    load_experts,
    load_model,
)

pytestmark = pytest.mark.unit


def test_attention_side_reads_no_routed_expert(reference_checkpoints) -> None:
    reader = CheckpointReader(reference_checkpoints["v2"])
    model = load_attention_side(reference_checkpoints["v2"], reader=reader)
    assert reader.read_names, "nothing was read"
    assert not [n for n in reader.read_names if ".mlp.experts." in n]
    expected = {n for n in reader.names if ".mlp.experts." not in n}
    assert set(reader.read_names) == expected
    assert model.local_experts() == {}


def test_expert_role_reads_only_its_experts(reference_checkpoints) -> None:
    reader = CheckpointReader(reference_checkpoints["v3"])
    experts = load_experts(reference_checkpoints["v3"], [2, 5], reader=reader)
    assert sorted(experts) == [2, 3]  # v3 reference: first_k_dense_replace=2 of 4 layers
    assert reader.read_names
    assert all(".mlp.experts.2." in n or ".mlp.experts.5." in n for n in reader.read_names)
    assert len(reader.read_names) == 2 * 2 * 3  # layers x experts x (gate, up, down)
    full = load_model(reference_checkpoints["v3"])
    assert torch.equal(experts[3].w2[1], full.layers[3].ffn.experts.w2[5])


def _copy_with(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(reference_checkpoints, tmp_path: Path) -> None:
    bad = _copy_with(reference_checkpoints["v2_lite"], tmp_path / "bad", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="norm.weight"):
        load_model(bad)


def test_missing_expert_is_named(reference_checkpoints, tmp_path: Path) -> None:
    bad = _copy_with(
        reference_checkpoints["v2_lite"],
        tmp_path / "bad",
        lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
    )
    with pytest.raises(CheckpointError, match="routed expert 3 .*layer 1"):
        load_model(bad)


def test_unexpected_tensor_is_named(reference_checkpoints, tmp_path: Path) -> None:
    def add(t: dict) -> None:
        t["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)

    bad = _copy_with(reference_checkpoints["v2_lite"], tmp_path / "bad", add)
    with pytest.raises(CheckpointError, match="mystery"):
        load_model(bad)


def test_misshaped_tensor_is_named(reference_checkpoints, tmp_path: Path) -> None:
    def shrink(t: dict) -> None:
        t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"][
            :, :3
        ].clone()

    bad = _copy_with(reference_checkpoints["v2_lite"], tmp_path / "bad", shrink)
    with pytest.raises(CheckpointError, match=r"o_proj.weight.*shape \[64, 3\]"):
        load_model(bad)


def test_bf16_and_fp16_loading(reference_checkpoints) -> None:
    for dtype in (torch.bfloat16, torch.float16):
        model = load_model(reference_checkpoints["v3"], dtype)
        assert model.dtype == dtype
        assert model.layers[2].ffn.gate.weight.dtype == torch.float32  # routing stays fp32


def test_multi_token_prediction_layers_are_skipped(reference_checkpoints, tmp_path: Path) -> None:
    def add_mtp(t: dict) -> None:
        t["model.layers.4.eh_proj.weight"] = torch.zeros(4, 4)  # v3 reference has 4 layers

    path = _copy_with(reference_checkpoints["v3"], tmp_path / "mtp", add_mtp)
    with_mtp = load_model(path).state_dict()
    without = load_model(reference_checkpoints["v3"]).state_dict()
    assert with_mtp.keys() == without.keys()  # nothing of layer 4 was loaded, nothing is missing
    assert all(torch.equal(with_mtp[k], without[k]) for k in without)


def test_no_weights_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointReader(tmp_path)
