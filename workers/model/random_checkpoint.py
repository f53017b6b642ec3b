"""Model tools: random-weight checkpoints in Hugging Face layout, from named presets.

Used by the README's quick start, the benchmarks and the GPU checks; the tests build their
reference checkpoints with `transformers` instead, so the oracle never depends on this code.
Weights are drawn wider than the usual init (std 0.05 by default) so logits are not flat.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.loader import checkpoint_state_dict
from moeserve.workers.model.transformer import Transformer

_TINY = {
    "model_type": "deepseek_v2",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "q_lora_rank": None,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "topk_method": "greedy",
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
}

# The benchmark shape of the model-runtime issue: DeepSeek-V2-Lite attention, trimmed to fit a laptop.
_BENCH = {
    **_TINY,
    "vocab_size": 8192,
    "hidden_size": 2048,
    "intermediate_size": 5472,
    "moe_intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 16,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.0,
}

# DeepSeek-V2-Lite's published architecture (random weights), for GPU runs.
_V2_LITE = {
    **_BENCH,
    "vocab_size": 102400,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "n_routed_experts": 64,
    "max_position_embeddings": 163840,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
}

PRESETS: dict[str, dict[str, Any]] = {"tiny": _TINY, "bench": _BENCH, "v2-lite": _V2_LITE}


def init_random(config: ModelConfig, seed: int = 0, std: float = 0.05) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, std)
    return model.eval()


def write_random_checkpoint(
    out: str | Path,
    raw_config: dict[str, Any],
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    std: float = 0.05,
) -> Path:
    """Write config.json + model.safetensors for a random model of `raw_config` into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_dict(raw_config)
    model = init_random(config, seed, std).to(dtype)
    for block in model.layers:
        gate = getattr(block.ffn, "gate", None)
        if gate is not None:
            gate.float()
    torch_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    (out / "config.json").write_text(json.dumps({**raw_config, "torch_dtype": torch_dtype}, indent=2))
    tensors = checkpoint_state_dict(model)
    if config.num_nextn_predict_layers:  # an MTP layer, stored as DeepSeek-V3 publishes it
        tensors.update(random_mtp_state_dict(config, model, dtype, seed + 1, std))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def random_mtp_state_dict(
    config: ModelConfig, model: Transformer, dtype: torch.dtype, seed: int, std: float
) -> dict[str, torch.Tensor]:
    """A random MTP layer under checkpoint names, with copies of the model's embedding and head
    (`embed_tokens`, `shared_head.head`) as the published V3 checkpoints carry them."""
    from moeserve.workers.model.mtp import MTPLayer, mtp_state_dict

    torch.manual_seed(seed)
    mtp = MTPLayer(config)
    with torch.no_grad():
        for name, p in mtp.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, std)
        mtp.embed.weight.copy_(model.embed.weight)
        mtp.head.weight.copy_(model.head.weight)
    mtp = mtp.to(dtype)
    gate = getattr(mtp.block.ffn, "gate", None)
    if gate is not None:
        gate.float()
    return mtp_state_dict(mtp)
