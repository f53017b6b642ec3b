"""Load Hugging Face DeepSeek-V2/V3 safetensors checkpoints into moeserve modules.

Checkpoint names are mapped by the declarative tables below; nothing else knows them. Files are
memory-mapped (single `model.safetensors` or sharded with `model.safetensors.index.json`) and only
the tensors a role needs are read: the attention side (embeddings, MLA, norms, router, shared
experts, head) or a subset of routed experts. A missing, unexpected or mis-shaped tensor is a
`CheckpointError` naming it. Multi-token-prediction layers (index >= num_hidden_layers, as in
DeepSeek-V3) are skipped here; `mtp.load_mtp` reads the first one as a speculative draft layer.
FP8 block-scaled checkpoints (`quantization_config` fp8, each fp8 `<name>` with its fp32
`<name>_scale_inv`) load either kept fp8 (`fp8_weights="keep"`: linear layers become
`BlockFp8Linear`, routed experts keep per-expert block scales) or dequantized once to `dtype`
(`"dequantize"`, the default: faster on the CPU, see bench/bench_fp8.py). `kv_b_proj` is always
dequantized: the absorbed decode splits it per head into W_UK and W_UV.
bf16 checkpoints computed in fp32 on a CPU without native bf16 keep their linear-layer and routed
expert weights bf16 (`WidenedLinear`, `RoutedExperts(weight_dtype=bf16)`; widened inside each
product by `kernels/widen_gemm.py`), where `dtype_policy.matmul_weight_dtype` says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moeserve.serve_config import Fp8Weights
from moeserve.workers.kernels.widen_gemm import WidenedLinear
from moeserve.workers.model import fp8
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.dtype_policy import checkpoint_dtype, matmul_weight_dtype
from moeserve.workers.model.huge_pages import allocate_on_huge_pages
from moeserve.workers.model.moe import MoE, RoutedExperts, Router
from moeserve.workers.model.rope import RotaryEmbedding
from moeserve.workers.model.transformer import Transformer

EMBEDDED_MODEL_PATH = Path(__file__).parents[1] / "assets" / "default-model"
"""The small model that ships inside the package: the default wherever no model path is given."""


class CheckpointError(ValueError):
    """A checkpoint that does not fit the config; the message names the tensor."""


# checkpoint name -> our parameter name; "name[k/2]" is half k (along dim 0) of a fused tensor
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}
# suffix after "model.layers.{L}." -> suffix after "layers.{L}."
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_proj.bias": "attn.wq_a.bias",
    "self_attn.q_a_layernorm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.wkv_a.weight",
    "self_attn.kv_a_proj_with_mqa.bias": "attn.wkv_a.bias",
    "self_attn.kv_a_layernorm.weight": "attn.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.wkv_b.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "self_attn.o_proj.bias": "attn.wo.bias",
    "mlp.gate_proj.weight": "ffn.w13.weight[0/2]",
    "mlp.up_proj.weight": "ffn.w13.weight[1/2]",
    "mlp.down_proj.weight": "ffn.w2.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.e_score_correction_bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w13.weight[0/2]",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w13.weight[1/2]",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}
# suffix after "model.layers.{L}.mlp.experts.{E}." -> stacked tensor of RoutedExperts
EXPERT_NAMES = {
    "gate_proj.weight": "w13[0/2]",
    "up_proj.weight": "w13[1/2]",
    "down_proj.weight": "w2",
}

SCALE_SUFFIX = "_scale_inv"  # fp8 "<name>" -> its block scales "<name>_scale_inv"
# our parameters never kept fp8 (dequantized at load): MLA's absorbed decode splits wkv_b per head
ALWAYS_DEQUANTIZED = re.compile(r"\.attn\.wkv_b\.weight$")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_PART = re.compile(r"^(.+)\[([01])/2\]$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a parameter name, or (layer, expert, stacked name)."""

    param: str | None = None
    layer: int | None = None
    expert: int | None = None
    stacked: str | None = None
    scale: bool = False  # the fp8 block scales of that tensor, read together with it

    @property
    def is_routed_expert(self) -> bool:
        return self.expert is not None


def translate(name: str, config: ModelConfig) -> Target | None:
    """Map a checkpoint name; None for tensors deliberately not used. Unknown names raise."""
    if name.endswith(SCALE_SUFFIX):
        base = translate(name.removesuffix(SCALE_SUFFIX), config)
        return None if base is None else replace(base, scale=True)
    if name in GLOBAL_NAMES:
        return Target(param=GLOBAL_NAMES[name])
    if _IGNORED.search(name):
        return None
    m = _LAYER.match(name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if layer >= config.num_hidden_layers:
            return None  # multi-token-prediction module: not used for generation
        e = _EXPERT.match(rest)
        if e and e.group(2) in EXPERT_NAMES:
            return Target(layer=layer, expert=int(e.group(1)), stacked=EXPERT_NAMES[e.group(2)])
        if rest in LAYER_NAMES:
            return Target(param=f"layers.{layer}.{LAYER_NAMES[rest]}")
    raise CheckpointError(f"unexpected tensor {name!r} in checkpoint")


class CheckpointReader:
    """Lazily opened safetensors files of one checkpoint; records every tensor it reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self.file_of = dict(weight_map)
        elif single.exists():
            with safe_open(str(single), framework="pt") as f:
                self.file_of = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
        else:
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {self.path}")
        self._handles: dict[str, object] = {}
        self.read_names: list[str] = []

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())  # type: ignore[attr-defined]

    def is_fp8(self, name: str) -> bool:
        return self.dtype_name(name) == "F8_E4M3"

    def dtype_name(self, name: str) -> str:
        """The tensor's safetensors dtype ("BF16", "F32", "F8_E4M3", ...), from the header alone."""
        return str(self._handle(name).get_slice(name).get_dtype())  # type: ignore[attr-defined]

    def read(self, name: str) -> torch.Tensor:
        self.read_names.append(name)
        return self._handle(name).get_tensor(name)  # type: ignore[attr-defined]

    def read_weight(self, name: str, config: ModelConfig) -> torch.Tensor | fp8.BlockFp8:
        """A tensor; an fp8 one with its block scales (present and of the grid's shape, else an error
        naming them)."""
        tensor = self.read(name)
        if tensor.dtype != fp8.FP8:
            return tensor
        if config.quantization is None:
            raise CheckpointError(
                f"tensor {name!r} is float8_e4m3fn but config.json has no quantization_config"
            )
        block = config.quantization.weight_block_size
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.file_of:
            raise CheckpointError(f"fp8 tensor {name!r} has no block scales {scale_name!r} in the checkpoint")
        scale = self.read(scale_name)
        if tensor.dim() != 2:
            raise CheckpointError(f"fp8 tensor {name!r} has shape {list(tensor.shape)}: not a 2-D weight")
        want = list(fp8.scale_shape(tensor.shape[0], tensor.shape[1], block))
        if list(scale.shape) != want:
            raise CheckpointError(
                f"block scales {scale_name!r} have shape {list(scale.shape)}, expected {want} for "
                f"{name!r} {list(tensor.shape)} in {block[0]}x{block[1]} blocks"
            )
        return fp8.BlockFp8(tensor, scale.float(), block)

    def _handle(self, name: str) -> object:
        file = self.file_of[name]
        if file not in self._handles:
            path = self.path / file
            if not path.exists():
                raise CheckpointError(f"shard {file} (holding {name!r}) is missing from {self.path}")
            self._handles[file] = safe_open(str(path), framework="pt")
        return self._handles[file]


def split_part(target: str) -> tuple[str, int | None]:
    """ "ffn.w13.weight[1/2]" -> ("ffn.w13.weight", 1); plain names -> (name, None)."""
    m = _PART.match(target)
    return (m.group(1), int(m.group(2))) if m else (target, None)


def _slot(tensor: torch.Tensor, part: int | None) -> torch.Tensor:
    return tensor if part is None else tensor.chunk(2, dim=0)[part]


def _copy_into(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointError(f"tensor {name!r} has shape {list(src.shape)}, expected {list(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def store(
    dst: torch.Tensor,
    dst_scale: torch.Tensor | None,
    part: int | None,
    src: torch.Tensor | fp8.BlockFp8,
    name: str,
) -> None:
    """Put one checkpoint tensor (slot `part` of a fused destination): into a weight of the model
    dtype (an fp8 one dequantized), or, with `dst_scale`, into an fp8 weight and its block scales."""
    if dst_scale is None:
        _copy_into(
            _slot(dst, part), fp8.dequantize(src, dst.dtype) if isinstance(src, fp8.BlockFp8) else src, name
        )
        return
    if not isinstance(src, fp8.BlockFp8):
        raise CheckpointError(
            f"tensor {name!r} is {src.dtype}, but the weights it is fused or stacked with are fp8"
        )
    _copy_into(_slot(dst, part), src.weight, name)
    _copy_into(_slot(dst_scale, part), src.scale_inv, name + SCALE_SUFFIX)


def _plan(reader: CheckpointReader, config: ModelConfig) -> dict[str, Target]:
    plan = {name: t for name in reader.names if (t := translate(name, config)) is not None}
    for name, target in plan.items():
        weight = name.removesuffix(SCALE_SUFFIX)
        if target.scale and (weight not in plan or not reader.is_fp8(weight)):
            raise CheckpointError(f"unexpected tensor {name!r}: block scales of {weight!r}, which is not fp8")
    return plan


def _keeps_fp8(reader: CheckpointReader, config: ModelConfig, fp8_weights: Fp8Weights) -> bool:
    if fp8_weights not in ("keep", "dequantize"):
        raise ValueError(f"fp8_weights must be 'keep' or 'dequantize', got {fp8_weights!r}")
    return fp8_weights == "keep" and config.quantization is not None


def _routed_experts_fp8(reader: CheckpointReader, plan: dict[str, Target]) -> bool:
    """Whether the checkpoint's routed experts are fp8 (all of them or none: one stacked tensor)."""
    kinds = {reader.is_fp8(n) for n, t in plan.items() if t.is_routed_expert and not t.scale}
    if len(kinds) > 1:
        raise CheckpointError("some routed expert weights are fp8 and others are not")
    return kinds == {True}


def _use_fp8_linears(
    model: Transformer,
    reader: CheckpointReader,
    plan: dict[str, Target],
    block: tuple[int, int],
    dtype: torch.dtype,
) -> None:
    """Swap each nn.Linear whose checkpoint weight(s) are fp8 for a BlockFp8Linear (on meta)."""
    kinds: dict[str, set[bool]] = {}
    parts: dict[str, int] = {}
    for name, t in plan.items():
        if t.param is None or t.scale or ALWAYS_DEQUANTIZED.search(split_part(t.param)[0]):
            continue
        base, part = split_part(t.param)
        kinds.setdefault(base, set()).add(reader.is_fp8(name))
        parts[base] = 1 if part is None else 2
    for base, kind in kinds.items():
        if kind != {True}:
            if len(kind) > 1:
                raise CheckpointError(f"the halves of fused weight {base} are fp8 and not fp8 at once")
            continue
        path = base.removesuffix(".weight")
        linear = model.get_submodule(path)
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"fp8 weight for {base}, which is not a linear layer")
        parent, _, child = path.rpartition(".")
        with torch.device("meta"):
            swapped = fp8.BlockFp8Linear(
                linear.in_features, linear.out_features, linear.bias is not None, block, parts[base], dtype
            )
        setattr(model.get_submodule(parent), child, swapped)


def load_attention_side(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    reader: CheckpointReader | None = None,
    max_positions: int | None = None,
    device: str | torch.device = "cpu",
    fp8_weights: Fp8Weights = "dequantize",
    matmul_weights: torch.dtype | None = None,
) -> Transformer:
    """Everything but the routed experts, as an attention rank holds it."""
    return _load_transformer(path, dtype, False, reader, max_positions, device, fp8_weights, matmul_weights)


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    reader: CheckpointReader | None = None,
    max_positions: int | None = None,
    device: str | torch.device = "cpu",
    fp8_weights: Fp8Weights = "dequantize",
    matmul_weights: torch.dtype | None = None,
) -> Transformer:
    """The whole model in one process: attention side plus every routed expert. `dtype` is the
    activations' (and non-fp8 weights') dtype; `fp8_weights` how an fp8 checkpoint's weights are held.
    `matmul_weights`: the dtype of the linear layers' and routed experts' weights; None follows
    `dtype_policy.matmul_weight_dtype` (bf16 ones widened in the products on AVX2 hosts), and
    bfloat16 under fp32 `dtype` asks for that wherever the checkpoint's tensors are bf16."""
    return _load_transformer(path, dtype, True, reader, max_positions, device, fp8_weights, matmul_weights)


def load_experts(
    path: str | Path,
    expert_ids: Iterable[int],
    dtype: torch.dtype = torch.float32,
    reader: CheckpointReader | None = None,
    device: str | torch.device = "cpu",
    fp8_weights: Fp8Weights = "dequantize",
    matmul_weights: torch.dtype | None = None,
) -> dict[int, RoutedExperts]:
    """The given routed experts of every MoE layer, as an expert rank holds them."""
    config = ModelConfig.from_file(path)
    reader = reader or CheckpointReader(path)
    ids = sorted(set(expert_ids))
    bad = [e for e in ids if not 0 <= e < config.n_routed_experts]
    if bad:
        raise CheckpointError(f"expert ids {bad} out of range [0, {config.n_routed_experts})")
    plan = _plan(reader, config)
    block = _routed_fp8_block(reader, config, plan, fp8_weights)
    weights = _matmul_weights(path, config, dtype, device, matmul_weights)
    widen = block is None and weights != dtype and _routed_experts_bf16(reader, plan)
    experts = {
        layer: RoutedExperts(
            config.hidden_size,
            config.moe_intermediate_size,
            ids,
            dtype=dtype,
            fp8_block=block,
            weight_dtype=weights if widen else None,
        ).to(device)
        for layer in config.moe_layers
    }
    for module in experts.values():
        allocate_on_huge_pages(module)
    _fill_experts(reader, config, experts)
    return experts


def _matmul_weights(
    path: str | Path,
    config: ModelConfig,
    dtype: torch.dtype,
    device: str | torch.device,
    requested: torch.dtype | None,
) -> torch.dtype:
    """The dtype to hold linear and routed-expert weights in (see `load_model`)."""
    if requested is None:
        requested = matmul_weight_dtype(
            checkpoint_dtype(path), dtype, torch.device(device), quantized=config.quantization is not None
        )
    if requested not in (dtype, torch.bfloat16) or (requested != dtype and dtype != torch.float32):
        raise ValueError(f"matmul_weights {requested} under dtype {dtype}: only bf16 under fp32 is widened")
    return requested


def _routed_experts_bf16(reader: CheckpointReader, plan: dict[str, Target]) -> bool:
    names = [n for n, t in plan.items() if t.is_routed_expert and not t.scale]
    return bool(names) and all(reader.dtype_name(n) == "BF16" for n in names)


def _use_widened_linears(model: Transformer, reader: CheckpointReader, plan: dict[str, Target]) -> None:
    """Swap each nn.Linear whose checkpoint weight(s) are all bf16 for a WidenedLinear (on meta). MLA's
    wkv_b stays in the compute dtype: the absorbed decode splits it per head into its own tensors."""
    kinds: dict[str, set[str]] = {}
    for name, t in plan.items():
        if t.param is None or t.scale or t.is_routed_expert:
            continue
        base = split_part(t.param)[0]
        if base.endswith(".weight"):
            kinds.setdefault(base, set()).add(reader.dtype_name(name))
    for base, kind in kinds.items():
        path = base.removesuffix(".weight")
        tied_head = path == "head" and model.config.tie_word_embeddings
        if kind != {"BF16"} or path.endswith("wkv_b") or tied_head:
            continue
        linear = model.get_submodule(path)
        if type(linear) is not nn.Linear:
            continue
        parent, _, child = path.rpartition(".")
        with torch.device("meta"):
            swapped = WidenedLinear(linear.in_features, linear.out_features, linear.bias is not None)
        setattr(model.get_submodule(parent) if parent else model, child, swapped)


def _load_transformer(
    path: str | Path,
    dtype: torch.dtype,
    with_routed_experts: bool,
    reader: CheckpointReader | None,
    max_positions: int | None,
    device: str | torch.device,
    fp8_weights: Fp8Weights,
    matmul_weights: torch.dtype | None = None,
) -> Transformer:
    config = ModelConfig.from_file(path)
    reader = reader or CheckpointReader(path)
    plan = _plan(reader, config)
    with torch.device("meta"):
        model = Transformer(config, with_routed_experts=with_routed_experts)
    model = model.to(dtype)
    for module in model.modules():
        if isinstance(module, Router):
            module.float()  # routing stays fp32 (as transformers keeps gate.weight)
    if _keeps_fp8(reader, config, fp8_weights):
        assert config.quantization is not None
        _use_fp8_linears(model, reader, plan, config.quantization.weight_block_size, dtype)
    block = _routed_fp8_block(reader, config, plan, fp8_weights) if with_routed_experts else None
    weights = _matmul_weights(path, config, dtype, device, matmul_weights)
    if weights != dtype:
        _use_widened_linears(model, reader, plan)
    widen = with_routed_experts and block is None and weights != dtype and _routed_experts_bf16(reader, plan)
    if block is not None or widen:
        for moe in model.modules():
            if isinstance(moe, MoE) and moe.experts is not None:
                with torch.device("meta"):
                    moe.experts = RoutedExperts(
                        config.hidden_size,
                        config.moe_intermediate_size,
                        moe.experts.expert_ids,
                        dtype,
                        block,
                        weight_dtype=weights if widen else None,
                    )
    model = model.to_empty(device=device)
    allocate_on_huge_pages(model)
    model.rope = RotaryEmbedding(config, max_positions).to(device)
    params = dict(model.named_parameters())
    wanted = {name: t for name, t in plan.items() if not t.is_routed_expert and not t.scale}
    filled: set[str] = set()
    for name, target in wanted.items():
        assert target.param is not None
        if target.param == "head.weight" and config.tie_word_embeddings:
            continue
        base, part = split_part(target.param)
        if base not in params:
            raise CheckpointError(f"unexpected tensor {name!r}: the config has no {base}")
        scale = params.get(base + SCALE_SUFFIX)
        store(params[base], scale, part, reader.read_weight(name, config), name)
        filled.add(target.param)
        if scale is not None:
            filled.add(base + SCALE_SUFFIX + ("" if part is None else f"[{part}/2]"))
    if config.tie_word_embeddings:
        model.head.weight = model.embed.weight
        filled.add("head.weight")
    complete = {p for p in params if p in filled or {f"{p}[0/2]", f"{p}[1/2]"} <= filled}
    missing = [p for p in params if p not in complete and not _is_routed_param(p)]
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor(s) for: {', '.join(sorted(missing)[:10])}")
    if with_routed_experts:
        _fill_experts(reader, config, model.local_experts())
    for block in model.layers:
        block.attn.fuse_input_projections()
    model.eval()
    return model


def _is_routed_param(name: str) -> bool:
    return ".ffn.experts." in name


def _routed_fp8_block(
    reader: CheckpointReader, config: ModelConfig, plan: dict[str, Target], fp8_weights: Fp8Weights
) -> tuple[int, int] | None:
    """The block of fp8 routed experts that are kept fp8; None when they are held in the model dtype."""
    if not _keeps_fp8(reader, config, fp8_weights) or not _routed_experts_fp8(reader, plan):
        return None
    assert config.quantization is not None
    return config.quantization.weight_block_size


def _fill_experts(reader: CheckpointReader, config: ModelConfig, experts: dict[int, RoutedExperts]) -> None:
    plan = _plan(reader, config)
    by_key = {
        (t.layer, t.expert, t.stacked): name for name, t in plan.items() if t.is_routed_expert and not t.scale
    }
    for layer, module in experts.items():
        for local, expert in enumerate(module.expert_ids):
            for stacked in EXPERT_NAMES.values():
                name = by_key.get((layer, expert, stacked))
                if name is None:
                    raise CheckpointError(
                        f"checkpoint is missing routed expert {expert} ({stacked}) of layer {layer}"
                    )
                base, part = split_part(stacked)
                scales = getattr(module, base + SCALE_SUFFIX)
                store(
                    getattr(module, base)[local],
                    None if scales is None else scales[local],
                    part,
                    reader.read_weight(name, config),
                    name,
                )
    for (expert_layer, _, _), name in by_key.items():
        if expert_layer is not None and not config.is_moe_layer(expert_layer):
            raise CheckpointError(f"unexpected tensor {name!r}: layer {expert_layer} is dense in the config")


def checkpoint_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face checkpoint names (the tables above, inverted)."""

    def inverse(table: dict[str, str]) -> dict[str, list[tuple[int | None, str]]]:
        out: dict[str, list[tuple[int | None, str]]] = {}
        for hf, ours in table.items():
            base, part = split_part(ours)
            out.setdefault(base, []).append((part, hf))
        return out

    global_inv, layer_inv, expert_inv = inverse(GLOBAL_NAMES), inverse(LAYER_NAMES), inverse(EXPERT_NAMES)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in global_inv:
            out[global_inv[name][0][1]] = tensor
            continue
        layer_s, rest = name.removeprefix("layers.").split(".", 1)
        if rest.startswith("ffn.experts."):
            experts = model.layers[int(layer_s)].ffn.experts
            for part, hf_suffix in expert_inv[rest.removeprefix("ffn.experts.")]:
                for local, expert in enumerate(experts.expert_ids):
                    out[f"model.layers.{layer_s}.mlp.experts.{expert}.{hf_suffix}"] = _slot(
                        tensor[local], part
                    )
            continue
        for part, hf_rest in layer_inv[rest]:
            out[f"model.layers.{layer_s}.{hf_rest}"] = _slot(tensor, part)
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in out.items()}
