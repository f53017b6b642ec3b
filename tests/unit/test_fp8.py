"""FP8 block-scaled checkpoints: `moeserve model quantize-fp8` writes DeepSeek-V3's published format,
and the model loaded from it (fp8 kept or dequantized at load) equals transformers on the
dequantized checkpoint. The tiny model's dims (hidden 160, expert intermediate 80, ...) are not
multiples of 128, so partial blocks and gate/up halves on their own grids are exercised."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import COMMON, prefill_logits
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeserve.workers.cli.main import main as cli_main
from moeserve.workers.model import fp8
from moeserve.workers.model.loader import (
    CheckpointError,
    CheckpointReader,
    load_attention_side,
    load_experts,
    load_model,
)
from moeserve.workers.model.quantize_fp8 import is_quantized, quantize_checkpoint
from moeserve.workers.offline.generate import GenerationSettings, generate

pytestmark = pytest.mark.unit
FP8_V3: dict[str, Any] = dict(
    COMMON,
    hidden_size=160,
    intermediate_size=200,
    moe_intermediate_size=80,
    q_lora_rank=136,
    kv_lora_rank=48,
    num_hidden_layers=3,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    eos_token_id=None,  # greedy runs of 24 tokens never stop, on either side
)
MODES = ["keep", "dequantize"]


def naive_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """The published formula, written independently of moeserve: each 128x128 block times its scale."""
    n, k = weight.shape
    full = scale_inv.repeat_interleave(128, dim=0)[:n].repeat_interleave(128, dim=1)[:, :k]
    return weight.float() * full


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 source (written by transformers), its fp8 quantization, and that dequantized (the oracle's)."""
    import transformers

    root = tmp_path_factory.mktemp("fp8")
    torch.manual_seed(0)
    ref = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**FP8_V3))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.05)
        for name, b in ref.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.05)
    ref.eval().save_pretrained(root / "fp32")
    quantize_checkpoint(root / "fp32", root / "fp8")
    deq = root / "dequantized"
    deq.mkdir()
    tensors = load_file(str(root / "fp8" / "model.safetensors"))
    plain = {
        name: naive_dequantize(t, tensors[name + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t
        for name, t in tensors.items()
        if not name.endswith("_scale_inv")
    }
    save_file(plain, str(deq / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((root / "fp8" / "config.json").read_text())
    del config["quantization_config"]
    (deq / "config.json").write_text(json.dumps(config))
    return {"fp32": root / "fp32", "fp8": root / "fp8", "dequantized": deq}


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> torch.nn.Module:
    import transformers

    return transformers.DeepseekV3ForCausalLM.from_pretrained(checkpoints["dequantized"]).eval()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_checkpoint_has_the_published_layout(checkpoints: dict[str, Path]) -> None:
    config = json.loads((checkpoints["fp8"] / "config.json").read_text())
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    with safe_open(str(checkpoints["fp8"] / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        dtypes = {n: f.get_slice(n).get_dtype() for n in names}
        shapes = {n: f.get_slice(n).get_shape() for n in names}
    fp8_names = {n for n, d in dtypes.items() if d == "F8_E4M3"}
    expected_fp8 = {
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.0.self_attn.q_b_proj.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.shared_experts.gate_proj.weight",
        "model.layers.1.mlp.shared_experts.down_proj.weight",
        "model.layers.2.mlp.experts.7.up_proj.weight",
        "model.layers.2.mlp.experts.0.down_proj.weight",
    }
    assert expected_fp8 <= fp8_names
    kept_plain = (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.0.self_attn.kv_a_layernorm.weight",
        "model.layers.0.input_layernorm.weight",
    )
    for kept in kept_plain:
        assert dtypes[kept] == "F32", kept
        assert kept + "_scale_inv" not in names
    assert {n + "_scale_inv" for n in fp8_names} == {n for n in names if n.endswith("_scale_inv")}
    assert all(dtypes[n + "_scale_inv"] == "F32" for n in fp8_names)
    # partial blocks: ceil(rows / 128) x ceil(cols / 128)
    assert shapes["model.layers.0.self_attn.q_a_proj.weight_scale_inv"] == [2, 2]  # [136, 160]
    assert shapes["model.layers.2.mlp.experts.3.gate_proj.weight_scale_inv"] == [1, 2]  # [80, 160]
    assert shapes["model.layers.2.mlp.experts.3.down_proj.weight_scale_inv"] == [2, 1]  # [160, 80]
    assert shapes["model.layers.0.mlp.gate_proj.weight_scale_inv"] == [2, 2]  # [200, 160]
    assert is_quantized("model.layers.3.self_attn.o_proj.weight")  # an MTP layer's block too
    assert not is_quantized("model.layers.3.eh_proj.weight")
    assert not is_quantized("model.layers.3.shared_head.head.weight")


def test_quantize_dequantize_roundtrip_error_is_within_e4m3_rounding() -> None:
    w = torch.randn(300, 130, generator=torch.Generator().manual_seed(0))
    q = fp8.quantize(w)
    assert q.scale_inv.shape == (3, 2)
    err = (fp8.dequantize(q) - w).abs()
    bound = naive_dequantize(torch.ones(300, 130), q.scale_inv) * 448 * 2**-4  # half an ulp at 3 bits
    assert (err <= bound).all()
    assert torch.equal(fp8.dequantize(q), naive_dequantize(q.weight, q.scale_inv))


@pytest.mark.parametrize("mode", MODES)
def test_fp32_logits_equal_transformers_on_the_dequantized_checkpoint(
    checkpoints: dict[str, Path], reference: torch.nn.Module, mode: str
) -> None:
    ours = load_model(checkpoints["fp8"], torch.float32, fp8_weights=mode)
    kept = [m for m in ours.modules() if isinstance(m, fp8.BlockFp8Linear)]
    experts = ours.local_experts()
    if mode == "keep":
        assert kept and all(m.weight.dtype == torch.float8_e4m3fn for m in kept)
        assert all(
            e.w13.dtype == torch.float8_e4m3fn and e.w13_scale_inv is not None for e in experts.values()
        )
    else:
        assert not kept and all(e.w13.dtype == torch.float32 for e in experts.values())
    ids = prompt(40, seed=1)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].float()
    got = prefill_logits(ours, ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("mode", MODES)
def test_greedy_tokens_identical_to_transformers(
    checkpoints: dict[str, Path], reference: torch.nn.Module, mode: str
) -> None:
    ours = load_model(checkpoints["fp8"], torch.float32, fp8_weights=mode)
    ids = prompt(16, seed=2)
    with torch.no_grad():
        want = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[
            0, len(ids) :
        ].tolist()
    assert generate(ours, [ids], GenerationSettings(max_tokens=24, stop_at_eos=False))[0] == want


def test_bf16_activations_with_fp8_weights(checkpoints: dict[str, Path]) -> None:
    """--dtype sets the activations: with bf16 ones, kept fp8 weights are as close to the fp32 result
    as weights dequantized to bf16 at load. (Means, not maxima: in bf16 a near-tie in the router can
    pick another expert for a token, on either path.)"""
    ids = prompt(24, seed=3)
    exact = prefill_logits(load_model(checkpoints["fp8"], torch.float32), ids)
    errors = {}
    for mode in MODES:
        model = load_model(checkpoints["fp8"], torch.bfloat16, fp8_weights=mode)
        assert model.dtype == torch.bfloat16
        got = prefill_logits(model, ids)
        # a floor only: this random model's median top-1 margin is ~0.15, so bf16 rounding (in the
        # attention kernel as much as in the weights) flips a few near ties; the means below compare
        assert (got.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.75
        errors[mode] = (got - exact).abs().mean().item()
    assert errors["keep"] <= 0.1 * exact.abs().mean()
    assert errors["keep"] <= 2 * errors["dequantize"], errors


def test_partial_loading_by_role_reads_only_its_tensors(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["fp8"]
    reader = CheckpointReader(path)
    attention = load_attention_side(path, reader=reader, fp8_weights="keep")
    assert set(reader.read_names) == {n for n in reader.names if ".mlp.experts." not in n}
    assert any(n.endswith("_scale_inv") for n in reader.read_names)
    assert attention.local_experts() == {}
    reader = CheckpointReader(path)
    experts = load_experts(path, [2, 5], reader=reader, fp8_weights="keep")
    assert sorted(experts) == [1, 2]
    assert set(reader.read_names) == {
        f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight{scale}"
        for layer in (1, 2) for e in (2, 5) for proj in ("gate_proj", "up_proj", "down_proj")
        for scale in ("", "_scale_inv")
    }  # fmt: skip
    full = load_model(path, fp8_weights="keep")
    assert torch.equal(experts[2].w2[1].view(torch.uint8), full.layers[2].ffn.experts.w2[5].view(torch.uint8))
    assert torch.equal(experts[2].w13_scale_inv[0], full.layers[2].ffn.experts.w13_scale_inv[2])


def test_expert_subsets_compute_what_the_full_model_does(checkpoints: dict[str, Path]) -> None:
    """Placement: experts 2 and 5 on one rank give the full model's outputs for those experts."""
    sub = load_experts(checkpoints["fp8"], [5, 2], fp8_weights="keep")[2]
    full = load_model(checkpoints["fp8"], fp8_weights="keep").layers[2].ffn.experts
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(4))
    for local, expert in enumerate(sub.expert_ids):
        assert torch.equal(
            sub.down(sub.gate_up(x, local)[:, :80], local), full.down(full.gate_up(x, expert)[:, :80], expert)
        )


def _copy_fp8_with(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("mode", MODES)
def test_missing_scale_is_named(checkpoints: dict[str, Path], tmp_path: Path, mode: str) -> None:
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    bad = _copy_fp8_with(checkpoints["fp8"], tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"'model.layers.0.self_attn.o_proj.weight'.*'{name}'"):
        load_model(bad, fp8_weights=mode)


def test_missing_expert_scale_is_named(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    name = "model.layers.2.mlp.experts.6.up_proj.weight_scale_inv"
    bad = _copy_fp8_with(checkpoints["fp8"], tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name):
        load_experts(bad, [6], fp8_weights="keep")


@pytest.mark.parametrize("mode", MODES)
def test_misshaped_scale_is_named(checkpoints: dict[str, Path], tmp_path: Path, mode: str) -> None:
    name = "model.layers.2.mlp.experts.1.down_proj.weight_scale_inv"

    def shrink(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name][:1]  # [2, 1] -> [1, 1]: as if the partial block were dropped

    bad = _copy_fp8_with(checkpoints["fp8"], tmp_path / "bad", shrink)
    with pytest.raises(CheckpointError, match=rf"{name}.*\[1, 1\].*expected \[2, 1\]"):
        load_model(bad, fp8_weights=mode)


def test_scale_without_fp8_weight_is_named(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    def add(t: dict[str, torch.Tensor]) -> None:
        t["model.norm.weight_scale_inv"] = torch.ones(2, 2)

    bad = _copy_fp8_with(checkpoints["fp8"], tmp_path / "bad", add)
    with pytest.raises(CheckpointError, match="model.norm.weight_scale_inv"):
        load_model(bad)


def test_fp8_tensor_without_quantization_config_is_named(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    bad = shutil.copytree(checkpoints["fp8"], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    del config["quantization_config"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="float8_e4m3fn but config.json has no quantization_config"):
        load_model(bad)


def _cli_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    return int(exc.value.code or 0), capsys.readouterr().err


def test_quantize_fp8_cli_writes_a_loadable_checkpoint(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli-fp8"
    assert cli_main(["model", "quantize-fp8", "--in", str(checkpoints["fp32"]), "--out", str(out)]) == 0
    for name in ("config.json", "model.safetensors"):
        assert (out / name).read_bytes() == (checkpoints["fp8"] / name).read_bytes()


@pytest.mark.parametrize(
    "args,message",
    [
        (["model", "quantize-fp8", "--out", "X"], "--in"),
        (["model", "quantize-fp8", "--in", "SRC"], "--out"),
        (["model", "quantize-fp8", "--in", "NOWHERE", "--out", "X"], "--in: no config.json"),
        (["model", "quantize-fp8", "--in", "FP8", "--out", "NEW"], "--in: .*already quantized"),
        (["model", "quantize-fp8", "--in", "SRC", "--out", "FP8"], "--out: .*not an empty directory"),
    ],
)
def test_quantize_fp8_usage_errors_exit_2(
    checkpoints: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    paths = {
        "SRC": checkpoints["fp32"],
        "FP8": checkpoints["fp8"],
        "NOWHERE": tmp_path / "none",
        "NEW": tmp_path / "new",
    }
    argv = [str(paths.get(a, tmp_path / a) if a in paths or a == "X" else a) for a in args]
    code, err = _cli_exit(argv, capsys)
    assert code == 2
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize("command", [["generate", "--prompt-ids", "1,2"], ["serve"]])
def test_fp8_weights_flag_rejects_other_values(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _cli_exit([*command, "--fp8-weights", "int4"], capsys)
    assert code == 2 and "--fp8-weights" in err


def test_generate_with_kept_fp8_weights_prints_the_dequantized_tokens(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = {}
    for mode in MODES:
        argv = ["generate", "--model", str(checkpoints["fp8"]), "--prompt-ids", "5,6,7", "--max-tokens", "6"]
        assert cli_main([*argv, "--dtype", "float32", "--json", "--fp8-weights", mode]) == 0
        outputs[mode] = json.loads(capsys.readouterr().out)["token_ids"]
    assert outputs["keep"] == outputs["dequantize"] and len(outputs["keep"]) == 6
