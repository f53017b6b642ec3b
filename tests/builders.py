"""Small builders for test objects: reference checkpoints made with `transformers`.

The reference model is the oracle, so these checkpoints are written by `transformers` itself
(`save_pretrained`), never by moeserve's own writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
)

# name -> (transformers config class name, kwargs)
REFERENCE_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # V2-Lite-like: no query compression, greedy routing
    "v2_lite": ("DeepseekV2", dict(COMMON, q_lora_rank=None, n_shared_experts=2, first_k_dense_replace=1)),
    # V2-like: query LoRA, group-limited routing, big routed scaling, YaRN
    "v2": (
        "DeepseekV2",
        dict(
            COMMON,
            q_lora_rank=24,
            n_shared_experts=2,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=16.0,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=128,
                beta_fast=32,
                beta_slow=1,
                mscale=0.707,
                mscale_all_dim=0.707,
            ),
        ),
    ),
    # V3-like: noaux_tc with a correction bias, sigmoid scores, normalised top-k, two dense layers
    "v3": (
        "DeepseekV3",
        dict(
            COMMON,
            num_hidden_layers=4,
            q_lora_rank=24,
            n_shared_experts=1,
            first_k_dense_replace=2,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
    ),
}


def reference_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A transformers DeepseekV2/V3ForCausalLM with weights drawn wider than the default init."""
    import transformers

    family, kwargs = REFERENCE_CONFIGS[name]
    config = getattr(transformers, f"{family}Config")(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
        for bname, b in model.named_buffers():
            if "e_score_correction_bias" in bname:
                b.normal_(0.0, 0.05)
    return model.eval()


def write_reference_checkpoint(name: str, out: Path, max_shard_size: str | None = None) -> Path:
    model = reference_model(name)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out
