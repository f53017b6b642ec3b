"""Model configuration for the DeepSeek-V2 / V2-Lite / V3 family, read from a checkpoint's config.json.

This module only parses and validates architecture figures; it knows nothing about weights,
devices or parallelism. A field absent from the file takes the default of its `model_type`
(as `transformers` does), an unknown `model_type` or a missing required field is a `ConfigError`
that names it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]
ScoringFunc = Literal["softmax", "sigmoid"]
ModelType = Literal["deepseek_v2", "deepseek_v3"]


class ConfigError(ValueError):
    """A config.json that cannot describe a model we can run; the message names the field."""


# Fields every checkpoint must state: they fix tensor shapes, so no default is safe.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "intermediate_size",
)

# Per-model-type defaults for optional fields, as in transformers' DeepseekV2Config / DeepseekV3Config.
MODEL_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {
        "q_lora_rank": 1536,
        "moe_intermediate_size": 1407,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": None,
        "topk_method": "greedy",
        "n_group": None,
        "topk_group": None,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "first_k_dense_replace": 0,
        "moe_layer_freq": 1,
        "rope_interleave": True,
        "max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "deepseek_v3": {
        "q_lora_rank": 1536,
        "moe_intermediate_size": 2048,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "first_k_dense_replace": 3,
        "moe_layer_freq": 1,
        "rope_interleave": True,
        "max_position_embeddings": 4096,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction: 0.1 * mscale * ln(scale) + 1 (1 when not scaled)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding over the `qk_rope_head_dim` slice; `yarn` extends the context window."""

    theta: float = 10000.0
    type: Literal["default", "yarn"] = "default"
    # yarn
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # scales cos/sin; derived from mscales when None


@dataclass(frozen=True)
class Fp8Quantization:
    """`quantization_config` of a block-scaled FP8 checkpoint (DeepSeek-V3 as published): fp8 e4m3
    weights with one fp32 `weight_scale_inv` per `weight_block_size` block (rows, cols)."""

    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: Literal["dynamic"] = "dynamic"

    @classmethod
    def from_dict(cls, raw: Any) -> Fp8Quantization:
        if not isinstance(raw, dict):
            raise ConfigError(f"quantization_config must be an object, got {raw!r}")
        checks = (("quant_method", ("fp8",)), ("fmt", ("e4m3",)), ("activation_scheme", ("dynamic",)))
        for key, allowed in checks:
            if raw.get(key, allowed[0]) not in allowed:
                raise ConfigError(
                    f"quantization_config.{key} {raw.get(key)!r} is not supported ({allowed[0]})"
                )
        block = raw.get("weight_block_size", [128, 128])
        if not (
            isinstance(block, list | tuple)
            and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise ConfigError(f"quantization_config.weight_block_size {block!r} is not two positive integers")
        return cls(weight_block_size=(block[0], block[1]))

    def to_dict(self) -> dict[str, Any]:
        """The published form, as config.json states it."""
        return {
            "activation_scheme": self.activation_scheme,
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(self.weight_block_size),
        }


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one DeepSeek-V2/V3 checkpoint. Build with `ModelConfig.from_dict` / `from_file`."""

    model_type: ModelType = "deepseek_v2"
    vocab_size: int = 102400
    hidden_size: int = 4096
    num_hidden_layers: int = 30
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # mla
    num_attention_heads: int = 32
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # rope / yarn
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    # dense mlp
    intermediate_size: int = 11008
    # moe
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    moe_intermediate_size: int = 1407
    num_experts_per_tok: int = 6
    topk_method: TopkMethod = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    scoring_func: ScoringFunc = "softmax"
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # quantization: None for bf16/fp32 weights
    quantization: Fp8Quantization | None = None
    # multi-token prediction (DeepSeek-V3 §2.2): extra layers at model.layers.<num_hidden_layers + k>
    num_nextn_predict_layers: int = 0

    def __post_init__(self) -> None:
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                f"({self.n_routed_experts})"
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"n_routed_experts ({self.n_routed_experts}) is not divisible by n_group")
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.moe_layer_freq < 1:
            raise ConfigError("moe_layer_freq must be >= 1")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError("num_nextn_predict_layers must be >= 0")

    # derived figures
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: the compressed KV plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # construction
    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPE_DEFAULTS:
            raise ConfigError(
                f"unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPE_DEFAULTS)}"
            )
        missing = [name for name in REQUIRED_FIELDS if raw.get(name) is None]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        merged = {**MODEL_TYPE_DEFAULTS[model_type], **{k: v for k, v in raw.items() if v is not None}}
        # Keys the file states as null keep null (q_lora_rank: null means no query compression).
        for key in ("q_lora_rank",):
            if key in raw and raw[key] is None:
                merged[key] = None
        if merged.get("num_experts_per_tok") is None:
            raise ConfigError("config.json is missing required field: num_experts_per_tok")
        scoring = merged.get("scoring_func", "softmax" if model_type == "deepseek_v2" else "sigmoid")
        eos = merged.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        own = {f.name for f in fields(cls)}
        kwargs = {
            k: merged[k] for k in own if k in merged and k not in ("rope", "eos_token_ids", "quantization")
        }
        if merged.get("quantization_config") is not None:
            kwargs["quantization"] = Fp8Quantization.from_dict(merged["quantization_config"])
        kwargs["n_group"] = merged.get("n_group") or 1
        kwargs["topk_group"] = merged.get("topk_group") or 1
        kwargs["scoring_func"] = scoring
        kwargs["q_lora_rank"] = merged.get("q_lora_rank")
        for name, allowed in (
            ("topk_method", ("greedy", "group_limited_greedy", "noaux_tc")),
            ("scoring_func", ("softmax", "sigmoid")),
        ):
            if kwargs[name] not in allowed:
                raise ConfigError(f"{name} {kwargs[name]!r} is not one of {allowed}")
        return cls(**kwargs, rope=_rope_from_dict(merged), eos_token_ids=eos_ids)


def _rope_from_dict(merged: dict[str, Any]) -> RopeConfig:
    """Accept both the published form (`rope_theta` + `rope_scaling`) and the newer `rope_parameters`."""
    params: dict[str, Any] = dict(merged.get("rope_parameters") or {})
    scaling = merged.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", merged.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type != "yarn":
        raise ConfigError(f"rope type {rope_type!r} is not supported (default or yarn)")
    max_pos = int(merged["max_position_embeddings"])
    original = int(params.get("original_max_position_embeddings") or max_pos)
    factor = params.get("factor")
    return RopeConfig(
        theta=theta,
        type="yarn",
        factor=float(factor) if factor is not None else max_pos / original,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=params.get("attention_factor"),
    )
