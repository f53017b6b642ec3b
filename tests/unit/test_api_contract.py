"""The gRPC API's source of truth: generated code is up to date, and every rpc and field is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeserve import contract
from moeserve.v1 import codegen, inference_pb2

pytestmark = pytest.mark.unit
PROTO = codegen.HERE / "inference.proto"


def test_regenerating_the_grpc_code_changes_nothing(tmp_path: Path) -> None:
    generated = codegen.generate(tmp_path)
    assert len(generated) == 3
    for path in generated:
        committed = codegen.HERE / path.name
        assert committed.read_bytes() == path.read_bytes(), f"{committed.name} is stale: run the codegen"


def test_every_rpc_and_field_has_a_comment() -> None:
    lines = PROTO.read_text().splitlines()
    declaration = re.compile(r"^\s*(rpc \w+|(optional |repeated )?[\w.]+ \w+ = \d+;|\w+ = \d+;)")
    undocumented = [
        line.strip()
        for i, line in enumerate(lines)
        if declaration.match(line) and not lines[i - 1].strip().startswith("//")
    ]
    assert undocumented == []
    assert len([line for line in lines if declaration.match(line)]) > 40


def test_service_name_in_the_contract_matches_the_proto() -> None:
    assert inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name == contract.INFERENCE_SERVICE
    assert inference_pb2.DESCRIPTOR.package == contract.GRPC_PACKAGE
