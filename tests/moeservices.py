"""Small builders for MoEService test objects, shared by the unit and k8s tiers (no torch import).

`moeservice(name, **spec)` is a minimal valid MoEService with `spec` entries replaced (nested
mappings merge); `example()` is the chart's example, which the tests treat as documentation that
must keep working.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "moeserve"
CRD_FILE = CHART / "crds" / "moeservices.moeserve.io.yaml"
EXAMPLE_FILE = CHART / "examples" / "moeservice.yaml"
IMAGE = "registry.invalid/moeserve:test"


def example() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(EXAMPLE_FILE.read_text())
    return loaded


def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return loaded


def moeservice(name: str = "demo", namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    """A MoEService: 1 instance of 2 attention + 2 expert ranks, 1 GPU each, with `spec` merged in."""
    base: dict[str, Any] = {
        "image": IMAGE,
        "replicas": 1,
        "model": {"path": "/models/tiny"},
        "attention": {"ranks": 2, "gpusPerRank": 1},
        "experts": {"ranks": 2, "gpusPerRank": 1},
    }
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "moeserve.io/v1alpha1",
        "kind": "MoEService",
        "metadata": metadata,
        "spec": merge(base, spec),
    }


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in, recursively for mappings; None deletes a key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
