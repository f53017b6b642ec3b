"""`spec.model.fp8Weights` of a MoEService reaches the Serve application's config and every rank.

The CRD defaults it to `dequantize` and admits only the two modes (the k8s tier checks the API
server's rejection); the operator's own reading rejects anything else naming the field. No cluster.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from moeserve import contract
from moeserve.operator import builders
from moeserve.operator.builders import Owner
from moeserve.operator.spec import MoEServiceSpec, SpecError, serve_app_config
from moeserve.serve_config import FP8_WEIGHTS, ServeAppConfig
from tests.moeservices import crd, moeservice

pytestmark = pytest.mark.unit

OWNER = Owner(name="demo", namespace="models", uid="0000-uid")


def spec_of(**overrides: Any) -> MoEServiceSpec:
    return MoEServiceSpec.from_dict(moeservice(**overrides)["spec"])


def test_kept_fp8_weights_travel_from_the_spec_to_the_config_map() -> None:
    spec = spec_of(model={"fp8Weights": "keep"})
    assert serve_app_config(spec).model.fp8_weights == "keep"
    data = builders.desired_state(OWNER, spec).config_map["data"]
    assert json.loads(data[contract.SERVE_CONFIG_KEY])["model"]["fp8_weights"] == "keep"
    assert serve_app_config(spec_of()).model.fp8_weights == "dequantize"  # absent: dequantized at load


def test_the_ray_app_gives_every_rank_the_mode() -> None:
    from moeserve.workers.ray_app.app import rank_spec  # needs the ray extra (installed for tests)

    cfg = ServeAppConfig.from_dict({"expert_ranks": 2, "model": {"fp8_weights": "keep"}})
    assert rank_spec(cfg).ep.fp8_weights == "keep"


def test_an_unknown_mode_is_rejected_naming_the_field() -> None:
    with pytest.raises(SpecError, match=r"^spec.model.fp8Weights: must be one of dequantize, keep"):
        spec_of(model={"fp8Weights": "int4"})


def test_the_crd_admits_the_same_modes_with_the_same_default() -> None:
    (version,) = crd()["spec"]["versions"]
    model = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["model"]
    field = model["properties"]["fp8Weights"]
    assert tuple(field["enum"]) == FP8_WEIGHTS and field["default"] == "dequantize"
