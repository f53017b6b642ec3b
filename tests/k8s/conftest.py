"""Fixtures for the k8s test tier: one real control plane per session, and clients for it.

`k8s_cluster` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok with four
fake GPU nodes (tests/controlplane), and stops them at the end of the session. It never skips: when
binaries or kubectl are missing, every test that uses it errors with what is missing and how to get
it. After a failed test the state directory (logs, kubeconfigs) is kept and its path printed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from tests.controlplane import ControlPlane, MissingBinariesError, StartError, locate_binaries
from tests.controlplane.cluster import remove_state
from tests.controlplane.waiting import wait_until

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def _report(request: pytest.FixtureRequest, line: str) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """A running control plane; `.kubeconfig` is the admin kubeconfig."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl not found on PATH: install it with `apt-get install -y kubectl`", pytrace=False)
    try:
        bin_dir = locate_binaries()
    except MissingBinariesError as err:
        missing = str(err)
    else:
        missing = ""
    if missing:
        pytest.fail(missing, pytrace=False)
    state_dir = Path(tempfile.mkdtemp(prefix="moeserve-k8s-"))
    plane = ControlPlane(state_dir, bin_dir, die_with_parent=True)
    failure = ""
    try:
        plane.start()
    except StartError as err:
        failure = f"control plane did not start; state kept in {state_dir}\n{err}"
        plane.stop()
    if failure:
        pytest.fail(failure, pytrace=False)
    try:
        yield plane
    finally:
        plane.stop()
        if request.session.testsfailed:
            _report(request, f"k8s_cluster: tests failed; control-plane logs kept in {plane.log_dir}")
        else:
            remove_state(state_dir)


@pytest.fixture(scope="session")
def k8s_client(k8s_cluster: ControlPlane) -> Iterator[client.ApiClient]:
    """An official `kubernetes` client with admin rights."""
    api = config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def kubectl(k8s_cluster: ControlPlane) -> Kubectl:
    """Run kubectl against the cluster: `kubectl("get", "nodes", kubeconfig=None, check=True)`."""

    def run(
        *args: str, kubeconfig: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        path = kubeconfig or k8s_cluster.kubeconfig
        command = ["kubectl", f"--kubeconfig={path}", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
        return done

    return run


@pytest.fixture
def namespace(k8s_client: client.ApiClient) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount exists (so pods can be created), deleted after."""
    core = client.CoreV1Api(k8s_client)
    name = f"test-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_until(
        f"ServiceAccount {name}/default",
        lambda: core.read_namespaced_service_account("default", name),
        timeout_s=30,
        ignore=(client.ApiException,),
    )
    try:
        yield name
    finally:
        core.delete_namespace(name)
