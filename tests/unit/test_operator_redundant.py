"""`spec.experts.redundant`, `rebalanceInterval` and `rebalanceMinGain` of a MoEService reach the
Serve application's config and the ranks.

The operator's ConfigMap carries `redundant_experts`, `rebalance_interval` and `rebalance_min_gain`;
the Ray app gives them to every rank's `EPSettings`; the CRD defaults them (0, 0, 0.05) and bounds
them (the k8s tier checks the API server's rejection); an explicit placement may host an expert on
several ranks only with redundant slots. No cluster, no torch model.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from moeserve import contract
from moeserve.operator import builders
from moeserve.operator.builders import Owner
from moeserve.operator.spec import MoEServiceSpec, SpecError, serve_app_config
from moeserve.serve_config import ServeAppConfig, ServeConfigError
from tests.moeservices import crd, moeservice

pytestmark = pytest.mark.unit

OWNER = Owner(name="demo", namespace="models", uid="0000-uid")


def spec_of(**overrides: Any) -> MoEServiceSpec:
    return MoEServiceSpec.from_dict(moeservice(**overrides)["spec"])


def test_redundant_experts_travel_from_the_spec_to_the_config_map() -> None:
    spec = spec_of(experts={"redundant": 2})
    assert spec.experts.redundant == 2
    assert serve_app_config(spec).redundant_experts == 2
    data = builders.desired_state(OWNER, spec).config_map["data"]
    assert json.loads(data[contract.SERVE_CONFIG_KEY])["redundant_experts"] == 2
    assert spec_of().experts.redundant == 0  # absent: none


def test_the_ray_app_gives_every_rank_the_redundant_slots() -> None:
    from moeserve.workers.ray_app.app import rank_spec  # needs the ray extra (installed for tests)

    cfg = ServeAppConfig.from_dict({"expert_ranks": 2, "redundant_experts": 3})
    assert rank_spec(cfg).ep.redundant_experts == 3


def test_negative_redundancy_is_rejected_naming_the_field() -> None:
    with pytest.raises(ServeConfigError, match=r"^redundant_experts: must be >= 0"):
        ServeAppConfig.from_dict({"redundant_experts": -1})


def test_a_placement_with_replicas_needs_redundant_slots() -> None:
    with pytest.raises(ServeConfigError, match="hosted more than once"):
        serve_app_config(spec_of(experts={"placement": [[0, 1], [1, 2]]}))
    cfg = serve_app_config(spec_of(experts={"placement": [[0, 1], [1, 2]], "redundant": 1}))
    assert cfg.placement == [[0, 1], [1, 2]] and cfg.redundant_experts == 1


def test_the_crd_defaults_redundant_to_zero_and_forbids_negatives() -> None:
    (version,) = crd()["spec"]["versions"]
    experts = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["experts"]
    field = experts["properties"]["redundant"]
    assert field["type"] == "integer" and field["minimum"] == 0 and field["default"] == 0


def test_rebalancing_travels_from_the_spec_to_the_config_map() -> None:
    spec = spec_of(experts={"rebalanceInterval": 16, "rebalanceMinGain": 0.1})
    cfg = serve_app_config(spec)
    assert (cfg.rebalance_interval, cfg.rebalance_min_gain) == (16, 0.1)
    data = json.loads(builders.desired_state(OWNER, spec).config_map["data"][contract.SERVE_CONFIG_KEY])
    assert (data["rebalance_interval"], data["rebalance_min_gain"]) == (16, 0.1)
    absent = serve_app_config(spec_of())  # absent: only on request, the CLI's default gain
    assert (absent.rebalance_interval, absent.rebalance_min_gain) == (0, 0.05)
    assert serve_app_config(spec_of(experts={"rebalanceMinGain": 0})).rebalance_min_gain == 0.0  # an integer


def test_the_ray_app_gives_every_rank_the_rebalance_settings() -> None:
    from moeserve.workers.ray_app.app import rank_spec  # needs the ray extra (installed for tests)

    cfg = ServeAppConfig.from_dict({"expert_ranks": 2, "rebalance_interval": 8, "rebalance_min_gain": 0.2})
    ep = rank_spec(cfg).ep
    assert (ep.rebalance_interval, ep.rebalance_min_gain) == (8, 0.2)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"rebalance_interval": -1}, r"^rebalance_interval: must be >= 0 steps"),
        ({"rebalance_interval": 2.5}, r"^rebalance_interval: expected an integer, got 2.5"),
        ({"rebalance_min_gain": 1.0}, r"^rebalance_min_gain: must be in \[0, 1\)"),
        ({"rebalance_min_gain": -0.1}, r"^rebalance_min_gain: must be in \[0, 1\)"),
        ({"rebalance_min_gain": "high"}, r"^rebalance_min_gain: expected a number, got 'high'"),
    ],
)
def test_bad_rebalance_settings_are_rejected_naming_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ServeConfigError, match=message):
        ServeAppConfig.from_dict(raw)


def test_the_spec_reader_names_a_mistyped_rebalance_field() -> None:
    with pytest.raises(SpecError, match=r"^spec.experts.rebalanceInterval: expected an integer, got '8'"):
        spec_of(experts={"rebalanceInterval": "8"})
    with pytest.raises(ServeConfigError, match=r"^rebalance_min_gain: must be in \[0, 1\)"):
        serve_app_config(spec_of(experts={"rebalanceMinGain": 1.5}))  # what the CRD's bound also refuses


def test_the_crd_bounds_and_defaults_the_rebalance_fields_as_the_config_does() -> None:
    (version,) = crd()["spec"]["versions"]
    experts = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["experts"]
    interval, gain = experts["properties"]["rebalanceInterval"], experts["properties"]["rebalanceMinGain"]
    assert interval["type"] == "integer" and interval["minimum"] == 0
    assert interval["default"] == ServeAppConfig.rebalance_interval
    assert (
        gain["type"] == "number"
        and gain["minimum"] == 0
        and gain["default"] == ServeAppConfig.rebalance_min_gain
    )
    assert gain["maximum"] == 1 and gain["exclusiveMaximum"] is True


def test_serve_with_ray_puts_its_balance_flags_into_the_serve_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """`moeserve serve --ray --rebalance-interval K` is no longer refused: the flags become the
    config the app gets (Ray itself is not started here)."""
    from moeserve.workers.cli import main as cli
    from moeserve.workers.ray_app import app

    got: list[ServeAppConfig] = []
    monkeypatch.setattr(app, "run_with_ray", lambda cfg, *_: got.append(cfg))
    flags = ["--redundant-experts", "2", "--rebalance-interval", "8", "--rebalance-min-gain", "0.1"]
    assert cli.main(["serve", "--ray", "--expert-ranks", "2", "--dtype", "float32", *flags]) == 0
    (cfg,) = got
    assert (cfg.redundant_experts, cfg.rebalance_interval, cfg.rebalance_min_gain) == (2, 8, 0.1)
