"""`spec.experts.redundant` of a MoEService reaches the Serve application's config and the ranks.

The operator's ConfigMap carries `redundant_experts`; the Ray app gives it to every rank's
`EPSettings`; the CRD defaults it to 0 and rejects negatives; an explicit placement may host an
expert on several ranks only with redundant slots. No cluster, no torch model.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from moeserve import contract
from moeserve.operator import builders
from moeserve.operator.builders import Owner
from moeserve.operator.spec import MoEServiceSpec, serve_app_config
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
