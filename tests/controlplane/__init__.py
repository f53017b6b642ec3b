"""Test control plane for moeserve: real Kubernetes components on 127.0.0.1, fake GPU nodes via kwok.

Build the binaries with `bash tests/controlplane/build.sh`; start a cluster with `ControlPlane` (the
pytest fixture `k8s_cluster` in tests/k8s/conftest.py does) or `python -m tests.controlplane up`.
This package is test infrastructure only; moeserve never imports it.
"""

from .cluster import (
    DEFAULT_NODES,
    GPU_RESOURCE,
    RACK_LABEL,
    ZONE_LABEL,
    ControlPlane,
    FakeNode,
    MissingBinariesError,
    StartError,
    locate_binaries,
)

__all__ = [
    "DEFAULT_NODES",
    "GPU_RESOURCE",
    "RACK_LABEL",
    "ZONE_LABEL",
    "ControlPlane",
    "FakeNode",
    "MissingBinariesError",
    "StartError",
    "locate_binaries",
]
