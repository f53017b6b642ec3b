"""DeepSeek-V3's multi-token-prediction (MTP) module (V3 report §2.2), used as a draft model.

The checkpoint stores it as an extra layer `model.layers.<num_hidden_layers>.*`: `enorm`, `hnorm`,
`eh_proj`, a full decoder block (MLA + MoE, the main layers' names) and `shared_head` (`norm`,
`head`), plus a copy of the embedding. At position i it reads the main model's hidden state h_i
(after the final norm, as vLLM and SGLang feed it) and the embedding of the next token t_{i+1}:

    h'_i = Block(eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)]))      logits_i = head(norm(h'_i))

and predicts t_{i+2}. Drafting k > 1 tokens reuses the layer on its own output h' in place of h.
Its block is layer `num_hidden_layers` of the paged latent cache (same block tables as the main
layers, so rolling back a sequence's token count rolls back this layer too) and of the routed
executor. This module computes the layer; it neither schedules, samples nor verifies drafts.
Legend: T tokens, D hidden, V vocab.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from moeserve.workers.model.batch import ForwardBatch
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.kv_cache import PagedLatentCache
from moeserve.workers.model.loader import (
    EXPERT_NAMES,
    LAYER_NAMES,
    SCALE_SUFFIX,
    CheckpointError,
    CheckpointReader,
    _slot,
    split_part,
    store,
)
from moeserve.workers.model.moe import MoE, RoutedExecutor, RoutedExperts, Router
from moeserve.workers.model.norm import RMSNorm
from moeserve.workers.model.rope import RotaryEmbedding
from moeserve.workers.model.transformer import Block, Transformer

# suffix after "model.layers.{N}." (N = num_hidden_layers) -> parameter of MTPLayer; the decoder
# block's own tensors follow LAYER_NAMES under "block.", its routed experts EXPERT_NAMES
MTP_NAMES = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "norm.weight",
    "shared_head.head.weight": "head.weight",
    "embed_tokens.weight": "embed.weight",
}
# shared with the main model when the checkpoint omits them (or stores an identical copy)
SHARED_WITH_MAIN = {"embed.weight": "embed.weight", "head.weight": "head.weight"}
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(.+)$")


class MTPLayer(nn.Module):
    """One MTP module. `layer` is its index in the cache and the executor (num_hidden_layers)."""

    def __init__(self, config: ModelConfig, with_routed_experts: bool = True):
        super().__init__()
        self.config = config
        self.layer = config.num_hidden_layers
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(config, self.layer, with_routed_experts)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.head = nn.Linear(d, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.eh_proj.weight.dtype

    def local_experts(self) -> dict[int, RoutedExperts]:
        ffn = self.block.ffn
        return {self.layer: ffn.experts} if isinstance(ffn, MoE) and ffn.experts is not None else {}

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        previous_hidden: torch.Tensor,
        cache: PagedLatentCache,
        rope: RotaryEmbedding,
        routed: RoutedExecutor,
    ) -> torch.Tensor:
        """batch.input_ids [T] are the next tokens t_{i+1} at positions i, previous_hidden [T, D] the
        hidden states h_i; returns h' [T, D] (before the shared head's norm). Writes the layer's
        latent cache at the batch's slots."""
        e = self.enorm(self.embed(batch.input_ids))  # [T, D]
        h = self.hnorm(previous_hidden.to(e.dtype))  # [T, D]
        x = self.eh_proj(torch.cat([e, h], dim=-1))  # [T, 2D] -> [T, D]
        return self.block(x, batch, cache, rope, routed, "auto")

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """h' [R, D] -> draft logits [R, V] fp32."""
        return self.head(self.norm(hidden)).float()


def has_mtp(config: ModelConfig) -> bool:
    return config.num_nextn_predict_layers > 0


def load_mtp(
    path: str | Path,
    model: Transformer,
    dtype: torch.dtype | None = None,
    reader: CheckpointReader | None = None,
    with_routed_experts: bool = True,
    device: str | torch.device | None = None,
) -> MTPLayer:
    """The checkpoint's first MTP layer beside `model` (its embedding and head are shared with the
    model when the checkpoint has no copy of them, or an identical one). An fp8 checkpoint's MTP
    weights are dequantized to `dtype` at load (a draft layer: small beside the main model, and run
    once per drafted token). Errors name the tensor."""
    config = model.config
    if not has_mtp(config):
        raise CheckpointError("the checkpoint has no MTP layer (config num_nextn_predict_layers is 0)")
    reader = reader or CheckpointReader(path)
    prefix = f"model.layers.{config.num_hidden_layers}."
    if not any(name.startswith(prefix) for name in reader.names):
        raise CheckpointError(f"the checkpoint has no MTP layer (no tensors {prefix}*)")
    dtype = dtype or model.dtype
    device = device or model.device
    with torch.device("meta"):
        mtp = MTPLayer(config, with_routed_experts)
    mtp = mtp.to(dtype)
    for module in mtp.modules():
        if isinstance(module, Router):
            module.float()  # routing stays fp32, as in the main layers
    mtp = mtp.to_empty(device=device)
    params = dict(mtp.named_parameters())
    table = {**MTP_NAMES, **{k: f"block.{v}" for k, v in LAYER_NAMES.items()}}
    experts = mtp.local_experts().get(mtp.layer)
    filled: set[str] = set()
    for name in reader.names:
        if not name.startswith(prefix):
            continue
        rest = name.removeprefix(prefix)
        if rest.endswith(SCALE_SUFFIX) and reader.is_fp8(name.removesuffix(SCALE_SUFFIX)):
            continue  # an fp8 weight's block scales: read (and checked) with the weight
        e = _EXPERT.match(rest)
        if e and e.group(2) in EXPERT_NAMES:
            continue  # routed experts: `_fill_experts`, here or on the expert ranks
        if rest not in table:
            raise CheckpointError(f"unexpected tensor {name!r} in the MTP layer")
        base, part = split_part(table[rest])
        if base not in params:
            raise CheckpointError(f"unexpected tensor {name!r}: the config has no {base}")
        store(params[base], None, part, reader.read_weight(name, config), name)
        filled.add(table[rest])
    main = dict(model.named_parameters())
    for ours, theirs in SHARED_WITH_MAIN.items():
        module_name = ours.split(".")[0]
        if ours not in filled or torch.equal(params[ours], main[theirs].to(params[ours].dtype)):
            if main[theirs].dtype == params[ours].dtype:
                getattr(mtp, module_name).weight = main[theirs]  # one tensor, not a copy
            else:  # the main model keeps it bf16 (`WidenedLinear`): share the module itself
                setattr(mtp, module_name, model.get_submodule(theirs.removesuffix(".weight")))
            filled.add(ours)
    if experts is not None:
        _fill_experts(reader, config, experts)
    complete = {
        p for p in params if p in filled or {f"{p}[0/2]", f"{p}[1/2]"} <= filled or ".ffn.experts." in p
    }
    missing = sorted(p for p in params if p not in complete)
    if missing:
        raise CheckpointError(f"checkpoint is missing MTP tensor(s) for: {', '.join(missing[:10])}")
    mtp.block.attn.fuse_input_projections()
    return mtp.eval()


def load_mtp_experts(
    path: str | Path,
    expert_ids: list[int],
    dtype: torch.dtype = torch.float32,
    reader: CheckpointReader | None = None,
    device: str | torch.device = "cpu",
) -> dict[int, RoutedExperts]:
    """The given routed experts of the MTP layer, as an expert rank holds them beside `load_experts`'
    ({num_hidden_layers: experts}; empty when the layer is dense). fp8 weights are dequantized to
    `dtype`, as `load_mtp` does."""
    config = ModelConfig.from_file(path)
    layer = config.num_hidden_layers
    if not has_mtp(config):
        raise CheckpointError("the checkpoint has no MTP layer (config num_nextn_predict_layers is 0)")
    if not config.is_moe_layer(layer):
        return {}
    ids = sorted(set(expert_ids))
    experts = RoutedExperts(config.hidden_size, config.moe_intermediate_size, ids, dtype=dtype).to(device)
    _fill_experts(reader or CheckpointReader(path), config, experts)
    return {layer: experts.eval()}


def _fill_experts(reader: CheckpointReader, config: ModelConfig, experts: RoutedExperts) -> None:
    """Read the MTP layer's routed experts `experts.expert_ids`; a missing one is named."""
    layer = config.num_hidden_layers
    prefix = f"model.layers.{layer}."
    local = {expert: i for i, expert in enumerate(experts.expert_ids)}
    filled: set[tuple[int, str]] = set()
    for name in reader.names:
        e = _EXPERT.match(name.removeprefix(prefix)) if name.startswith(prefix) else None
        if e is None or e.group(2) not in EXPERT_NAMES or int(e.group(1)) not in local:
            continue
        stacked = EXPERT_NAMES[e.group(2)]
        base, part = split_part(stacked)
        expert = int(e.group(1))
        store(getattr(experts, base)[local[expert]], None, part, reader.read_weight(name, config), name)
        filled.add((expert, stacked))
    for expert in experts.expert_ids:
        for stacked in EXPERT_NAMES.values():
            if (expert, stacked) not in filled:
                raise CheckpointError(
                    f"checkpoint is missing routed expert {expert} ({stacked}) of MTP layer {layer}"
                )


def mtp_state_dict(mtp: MTPLayer) -> dict[str, torch.Tensor]:
    """The layer's weights under checkpoint names (`model.layers.<N>.*`), embedding and head included."""
    inverse = {ours: hf for hf, ours in MTP_NAMES.items()}
    block_inverse: dict[str, list[tuple[int | None, str]]] = {}
    for hf, ours in LAYER_NAMES.items():
        base, part = split_part(ours)
        block_inverse.setdefault(base, []).append((part, hf))
    prefix = f"model.layers.{mtp.layer}."
    out: dict[str, torch.Tensor] = {}
    for name, tensor in mtp.state_dict().items():
        if name in inverse:
            out[prefix + inverse[name]] = tensor
        elif name.startswith("block.ffn.experts."):
            experts = mtp.local_experts()[mtp.layer]
            stacked = name.removeprefix("block.ffn.experts.")
            for hf_suffix, ours in EXPERT_NAMES.items():
                base, part = split_part(ours)
                if base != stacked:
                    continue
                for local, expert in enumerate(experts.expert_ids):
                    out[f"{prefix}mlp.experts.{expert}.{hf_suffix}"] = _slot(tensor[local], part)
        else:
            for part, hf in block_inverse[name.removeprefix("block.")]:
                out[prefix + hf] = _slot(tensor, part)
    return {k: v.contiguous() for k, v in out.items()}
