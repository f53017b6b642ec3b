"""Fixtures for the e2e tier: the test control plane plus one real node (tests/controlplane/node.py).

`e2e_cluster` starts etcd, the apiserver (on the node's address, reachable from pods), the
controllers and the real node (containerd, kubelet, kube-proxy, CoreDNS) with the images of
tests/controlplane/images.sh imported: `base` (debootstrap'ed Debian with python3) and `moeserve`
(the repository's Dockerfile). No kwok nodes: every pod lands on the real node. It records the host
state first and, after stopping, fails the run if anything it changed was not restored. What a
killed earlier run left (its bridge, mounts, nft tables) is cleared first and reported.

It never skips: without root, binaries, packages or images, every test that uses it fails with what
is missing and the command that installs or builds it. One real node per host: a second session
waits for the first (up to 30 minutes).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from tests.controlplane import ControlPlane, MissingBinariesError, StartError, locate_binaries
from tests.controlplane.cluster import remove_state
from tests.controlplane.node import CONTAINERD_STATE
from tests.controlplane.waiting import wait_until
from tests.e2e.support import Kubectl

START_TIMEOUT_S = 300.0
"""Control plane + node on a busy 2-core machine (an image import the first time comes on top)."""


def _report(request: pytest.FixtureRequest, line: str) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


@pytest.fixture(scope="session")
def e2e_cluster(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """A running control plane with one real node; `.kubeconfig` is the admin kubeconfig."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl not found on PATH: install it with `apt-get install -y kubectl`", pytrace=False)
    failure = ""
    try:
        bin_dir = locate_binaries()
    except MissingBinariesError as err:
        failure = str(err)
    if failure:
        pytest.fail(failure, pytrace=False)
    state_dir = Path(tempfile.mkdtemp(prefix="moeserve-e2e-"))
    plane = ControlPlane(state_dir, bin_dir, nodes=(), real_node=True, node_images=("base", "moeserve"))
    try:
        plane.start(timeout_s=START_TIMEOUT_S)
    except StartError as err:
        failure = f"control plane with a real node did not start; logs kept in {state_dir}\n{err}"
    if failure:
        pytest.fail(failure, pytrace=False)
    assert plane.real_node and plane.real_node.host_before
    before = plane.real_node.host_before  # as the node found the host, after clearing an abandoned one
    for line in plane.real_node.recovered:
        _report(request, f"e2e_cluster: cleared what a killed run left: {line}")
    try:
        yield plane
    finally:
        plane.stop()
        if request.session.testsfailed:
            _report(request, f"e2e_cluster: tests failed; logs kept in {plane.log_dir}")
        else:
            remove_state(state_dir)
        # The host must be as it was: sysctls, mounts, links, nft tables, cgroups, directories.
        diffs = before.differences([state_dir, CONTAINERD_STATE])
        left = [p for p in plane.node_leftovers if not p.startswith("killed a leftover")]
        if diffs or left:
            pytest.fail("the real node left the host changed:\n  " + "\n  ".join(left + diffs), pytrace=False)


@pytest.fixture(scope="session")
def e2e_client(e2e_cluster: ControlPlane) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(e2e_cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def kubectl(e2e_cluster: ControlPlane) -> Kubectl:
    """Run kubectl against the cluster: `kubectl("get", "pods", timeout_s=60, check=True)`."""

    def run(*args: str, timeout_s: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = ["kubectl", f"--kubeconfig={e2e_cluster.kubeconfig}", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}{done.stdout}"
            )
        return done

    return run


@pytest.fixture(scope="session")
def images(e2e_cluster: ControlPlane) -> dict[str, str]:
    """Image references imported into the node's containerd, by name (pause, base, moeserve)."""
    assert e2e_cluster.real_node
    return {name: image.ref for name, image in e2e_cluster.real_node.images.items()}


def new_namespace(core: client.CoreV1Api, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_until(
        f"ServiceAccount {name}/default",
        lambda: core.read_namespaced_service_account("default", name),
        timeout_s=60,
        ignore=(client.ApiException,),
    )
    return name


@pytest.fixture
def namespace(e2e_client: client.ApiClient) -> Iterator[str]:
    core = client.CoreV1Api(e2e_client)
    name = new_namespace(core, "e2e")
    try:
        yield name
    finally:
        core.delete_namespace(name)
