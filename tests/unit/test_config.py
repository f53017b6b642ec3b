"""config.json parsing for DeepSeek-V2, V2-Lite and V3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeserve.workers.model.config import ConfigError, ModelConfig

pytestmark = pytest.mark.unit

V2_LITE_PUBLISHED = {  # DeepSeek-V2-Lite's config.json, as published
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 6,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "tie_word_embeddings": False,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
}


def test_published_v2_lite_config() -> None:
    cfg = ModelConfig.from_dict(V2_LITE_PUBLISHED)
    assert cfg.q_lora_rank is None
    assert cfg.latent_dim == 576
    assert cfg.rope.type == "yarn" and cfg.rope.factor == 40 and cfg.rope.mscale_all_dim == 0.707
    assert cfg.moe_layers == list(range(1, 27))
    assert cfg.eos_token_ids == (100001,)
    # softmax scale carries the yarn mscale squared
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 0.707 * __import__("math").log(40) + 1) ** 2)


def test_rope_parameters_form_equals_rope_scaling_form() -> None:
    newer = dict(V2_LITE_PUBLISHED)
    scaling = newer.pop("rope_scaling")
    newer.pop("rope_theta")
    newer["rope_parameters"] = {
        **{k: v for k, v in scaling.items() if k != "type"},
        "rope_type": "yarn",
        "rope_theta": 10000,
    }
    assert ModelConfig.from_dict(newer) == ModelConfig.from_dict(V2_LITE_PUBLISHED)


def test_v3_config_without_topk_method_defaults_to_noaux_tc_sigmoid() -> None:
    raw = {
        k: v
        for k, v in V2_LITE_PUBLISHED.items()
        if k not in ("topk_method", "scoring_func", "norm_topk_prob")
    }
    raw.update(model_type="deepseek_v3", n_group=8, topk_group=4, n_routed_experts=64, rope_interleave=True)
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.topk_method, cfg.scoring_func, cfg.norm_topk_prob) == ("noaux_tc", "sigmoid", True)


def test_q_lora_rank_int_is_kept() -> None:
    assert ModelConfig.from_dict({**V2_LITE_PUBLISHED, "q_lora_rank": 1536}).q_lora_rank == 1536


def test_unknown_model_type_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown model_type 'llama'"):
        ModelConfig.from_dict({**V2_LITE_PUBLISHED, "model_type": "llama"})


def test_missing_required_field_is_named() -> None:
    raw = {k: v for k, v in V2_LITE_PUBLISHED.items() if k != "kv_lora_rank"}
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig.from_dict(raw)


def test_bad_topk_method_is_named() -> None:
    with pytest.raises(ConfigError, match="topk_method"):
        ModelConfig.from_dict({**V2_LITE_PUBLISHED, "topk_method": "random"})


def test_from_file_reads_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(V2_LITE_PUBLISHED))
    assert ModelConfig.from_file(tmp_path).hidden_size == 2048
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(tmp_path / "missing")
