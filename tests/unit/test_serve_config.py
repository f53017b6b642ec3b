"""The Ray Serve application config: defaults, round trip, errors naming the field."""

from __future__ import annotations

import pytest

from moeserve.serve_config import ServeAppConfig, ServeConfigError

pytestmark = pytest.mark.unit


def test_defaults_round_trip() -> None:
    cfg = ServeAppConfig.from_dict({})
    assert ServeAppConfig.from_dict(cfg.to_dict()) == cfg


def test_full_config() -> None:
    cfg = ServeAppConfig.from_dict(
        {
            "model": {"path": "/models/v2-lite", "dtype": "bfloat16", "fp8_weights": "keep"},
            "replicas": 2,
            "attention_ranks": 2,
            "expert_ranks": 2,
            "placement": [[0, 1], [2, 3]],
            "gpus_per_attention_rank": 1,
            "engine": {"block_size": 32, "max_model_len": 8192, "limits": {"max_stop_strings": 8}},
            "ports": {"grpc": 9000, "metrics": 8081},
        }
    )
    assert (
        cfg.engine.block_size == 32
        and cfg.engine.max_model_len == 8192
        and cfg.engine.limits.max_stop_strings == 8
        and cfg.gpus_per_attention_rank == 1.0
        and cfg.placement == [[0, 1], [2, 3]]
        and cfg.model.fp8_weights == "keep"
    )
    assert ServeAppConfig.from_dict({}).model.fp8_weights == "dequantize"


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"replicas": 0}, "replicas"),
        ({"attention_ranks": 0}, "attention_ranks"),
        ({"expert_ranks": 0}, "expert_ranks"),
        ({"replicas": "2"}, "replicas"),
        ({"model": {"dtype": "int8"}}, "model.dtype"),
        ({"model": {"fp8_weights": "int4"}}, "model.fp8_weights"),
        ({"model": {"nonsense": 1}}, "model.nonsense"),
        ({"engine": {"block_size": 0}}, "engine.block_size"),
        ({"engine": {"kv_cache_tokens": 4, "block_size": 16}}, "engine.kv_cache_tokens"),
        ({"ports": {"grpc": 70000}}, "ports.grpc"),
        ({"ports": {"grpc": 9000, "metrics": 9000}}, "ports.metrics"),
        ({"ports": {"http": 9000}}, "ports.http"),
        ({"ports": {"http": -1}}, "ports.http"),
        ({"openai": {"served_model_name": 3}}, "openai.served_model_name"),
        ({"openai": {"nonsense": ""}}, "openai.nonsense"),
        ({"expert_ranks": 2, "placement": [[0, 1]]}, "placement"),
        ({"expert_ranks": 2, "placement": [[0, 1], [1]]}, "placement"),
        ({"expert_ranks": 2, "placement": [[0], []]}, "placement"),
        ({"extra": True}, "extra"),
        ({"engine": 3}, "engine"),
        ({"engine": {"max_model_len": 1}}, "engine.max_model_len"),
        ({"engine": {"limits": {"max_prompt_bytes": -1}}}, "engine.limits.max_prompt_bytes"),
        ({"engine": {"limits": {"nonsense": 1}}}, "engine.limits.nonsense"),
    ],
)
def test_invalid_configs_name_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ServeConfigError, match=rf"^{field}:"):
        ServeAppConfig.from_dict(raw)
