"""Load Hugging Face DeepSeek-V2/V3 safetensors checkpoints into moeserve modules.

Checkpoint names are mapped by the declarative tables below; nothing else knows them. Files are
memory-mapped (single `model.safetensors` or sharded with `model.safetensors.index.json`) and only
the tensors a role needs are read: the attention side (embeddings, MLA, norms, router, shared
experts, head) or a subset of routed experts. A missing, unexpected or mis-shaped tensor is a
`CheckpointError` naming it. Multi-token-prediction layers (index >= num_hidden_layers, as in
DeepSeek-V3) are not used for generation and are skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.huge_pages import allocate_on_huge_pages
from moeserve.workers.model.moe import RoutedExperts, Router
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

    @property
    def is_routed_expert(self) -> bool:
        return self.expert is not None


def translate(name: str, config: ModelConfig) -> Target | None:
    """Map a checkpoint name; None for tensors deliberately not used. Unknown names raise."""
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

    def read(self, name: str) -> torch.Tensor:
        self.read_names.append(name)
        return self._handle(name).get_tensor(name)  # type: ignore[attr-defined]

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


def _plan(reader: CheckpointReader, config: ModelConfig) -> dict[str, Target]:
    return {name: t for name in reader.names if (t := translate(name, config)) is not None}


def load_attention_side(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    reader: CheckpointReader | None = None,
    max_positions: int | None = None,
    device: str | torch.device = "cpu",
) -> Transformer:
    """Everything but the routed experts, as an attention rank holds it."""
    return _load_transformer(path, dtype, False, reader, max_positions, device)


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    reader: CheckpointReader | None = None,
    max_positions: int | None = None,
    device: str | torch.device = "cpu",
) -> Transformer:
    """The whole model in one process: attention side plus every routed expert."""
    return _load_transformer(path, dtype, True, reader, max_positions, device)


def load_experts(
    path: str | Path,
    expert_ids: Iterable[int],
    dtype: torch.dtype = torch.float32,
    reader: CheckpointReader | None = None,
    device: str | torch.device = "cpu",
) -> dict[int, RoutedExperts]:
    """The given routed experts of every MoE layer, as an expert rank holds them."""
    config = ModelConfig.from_file(path)
    reader = reader or CheckpointReader(path)
    ids = sorted(set(expert_ids))
    bad = [e for e in ids if not 0 <= e < config.n_routed_experts]
    if bad:
        raise CheckpointError(f"expert ids {bad} out of range [0, {config.n_routed_experts})")
    experts = {
        layer: RoutedExperts(config.hidden_size, config.moe_intermediate_size, ids, dtype=dtype).to(device)
        for layer in config.moe_layers
    }
    for module in experts.values():
        allocate_on_huge_pages(module)
    _fill_experts(reader, config, experts)
    return experts


def _load_transformer(
    path: str | Path,
    dtype: torch.dtype,
    with_routed_experts: bool,
    reader: CheckpointReader | None,
    max_positions: int | None,
    device: str | torch.device,
) -> Transformer:
    config = ModelConfig.from_file(path)
    reader = reader or CheckpointReader(path)
    with torch.device("meta"):
        model = Transformer(config, with_routed_experts=with_routed_experts)
    model = model.to(dtype)
    for module in model.modules():
        if isinstance(module, Router):
            module.float()  # routing stays fp32 (as transformers keeps gate.weight)
    model = model.to_empty(device=device)
    allocate_on_huge_pages(model)
    model.rope = RotaryEmbedding(config, max_positions).to(device)
    params = dict(model.named_parameters())
    plan = _plan(reader, config)
    wanted = {name: t for name, t in plan.items() if not t.is_routed_expert}
    filled: set[str] = set()
    for name, target in wanted.items():
        assert target.param is not None
        if target.param == "head.weight" and config.tie_word_embeddings:
            continue
        base, part = split_part(target.param)
        if base not in params:
            raise CheckpointError(f"unexpected tensor {name!r}: the config has no {base}")
        _copy_into(_slot(params[base], part), reader.read(name), name)
        filled.add(target.param)
    if config.tie_word_embeddings:
        model.head.weight = model.embed.weight
        filled.add("head.weight")
    fused = {split_part(t)[0] for t in LAYER_NAMES.values() if split_part(t)[1] is not None}
    fused_params = {p for p in params if any(p.endswith(f) for f in fused)}
    complete = {
        p for p in params if p in filled or (p in fused_params and {f"{p}[0/2]", f"{p}[1/2]"} <= filled)
    }
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


def _fill_experts(reader: CheckpointReader, config: ModelConfig, experts: dict[int, RoutedExperts]) -> None:
    plan = _plan(reader, config)
    by_key = {(t.layer, t.expert, t.stacked): name for name, t in plan.items() if t.is_routed_expert}
    for layer, module in experts.items():
        for local, expert in enumerate(module.expert_ids):
            for stacked in EXPERT_NAMES.values():
                name = by_key.get((layer, expert, stacked))
                if name is None:
                    raise CheckpointError(
                        f"checkpoint is missing routed expert {expert} ({stacked}) of layer {layer}"
                    )
                base, part = split_part(stacked)
                _copy_into(_slot(getattr(module, base)[local], part), reader.read(name), name)
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
