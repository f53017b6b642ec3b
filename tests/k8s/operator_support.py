"""Helpers of the operator's k8s tests: Helm, reads through the admin client, the operator as a local
process with the chart ServiceAccount's kubeconfig, and waiting for pods."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from moeserve import contract
from tests.controlplane import ControlPlane, locate_binaries
from tests.controlplane.processes import Supervisor
from tests.controlplane.waiting import wait_until
from tests.moeservices import CHART

RELEASE = "moeserve"
SERVICE_ACCOUNT = "moeserve-moeserve-operator"
GROUP, VERSION, PLURAL = contract.API_GROUP, contract.API_VERSION, contract.PLURAL
Kubectl = Callable[..., Any]
Json = dict[str, Any]


def helm(kubeconfig: Path, *args: str, check: bool = True) -> Any:
    command = [str(locate_binaries() / "helm"), f"--kubeconfig={kubeconfig}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


@dataclass
class Cluster:
    """Reads as plain dicts through the admin client."""

    api: client.ApiClient

    def _get(self, path: str, query: list[tuple[str, str]] | None = None) -> Json:
        request = self.api.param_serialize(
            "GET", path, query_params=query or [], header_params={"Accept": "application/json"}
        )
        response = self.api.call_api(*request, _request_timeout=30)
        data = response.read()
        if response.status == 404:
            return {}
        assert response.status == 200, data
        answer: Json = json.loads(data)
        return answer

    def objects(self, kind: str, namespace: str, selector: str = "") -> list[Json]:
        prefix = f"/apis/{GROUP}/{VERSION}" if kind == PLURAL else "/api/v1"
        query = [("labelSelector", selector)] if selector else []
        items: list[Json] = self._get(f"{prefix}/namespaces/{namespace}/{kind}", query).get("items", [])
        return items

    def moe(self, namespace: str, name: str) -> Json:
        return self._get(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}")

    def pods(self, namespace: str, service: str, role: str | None = None) -> dict[str, Json]:
        selector = f"{contract.LABEL_SERVICE}={service}" + (f",{contract.LABEL_ROLE}={role}" if role else "")
        return {p["metadata"]["name"]: p for p in self.objects("pods", namespace, selector)}

    def endpoint_addresses(self, namespace: str, service: str) -> set[tuple[str, str]]:
        """(pod name, IP) of the ready endpoints of a Service, from its EndpointSlices."""
        path = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        query = [("labelSelector", f"kubernetes.io/service-name={service}")]
        return {
            (e.get("targetRef", {}).get("name", ""), address)
            for s in self._get(path, query).get("items", [])
            for e in s.get("endpoints") or []
            if e.get("conditions", {}).get("ready")
            for address in e["addresses"]
        }

    def patch_status(self, namespace: str, pod: str, status: Json) -> None:
        """Write a pod's status as its kubelet would (merge patch of the status subresource)."""
        request = self.api.param_serialize(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{pod}/status",
            header_params={"Content-Type": "application/merge-patch+json", "Accept": "application/json"},
            body={"status": status},
        )
        response = self.api.call_api(*request, _request_timeout=30)
        assert response.status == 200, response.read()

    def events(self, namespace: str, name: str) -> list[Json]:
        selector = [("fieldSelector", f"involvedObject.kind={contract.KIND},involvedObject.name={name}")]
        items: list[Json] = self._get(f"/api/v1/namespaces/{namespace}/events", selector).get("items", [])
        return items


def condition(moe: Json, kind: str) -> Json:
    return next((c for c in moe.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def running(pods: dict[str, Json]) -> bool:
    return bool(pods) and all(p.get("status", {}).get("phase") == "Running" for p in pods.values())


def uids(pods: dict[str, Json]) -> dict[str, str]:
    return {name: p["metadata"]["uid"] for name, p in pods.items()}


class Operator:
    """`moeserve-operator` as a local process with the chart ServiceAccount's kubeconfig; it dies
    with the test process. Each instance has its own state directory (pid file, log)."""

    def __init__(self, state_dir: Path, kubeconfig: Path, namespace: str) -> None:
        self.supervisor = Supervisor(state_dir / "pids", state_dir / "logs", die_with_parent=True)
        self.kubeconfig = kubeconfig
        self.namespace = namespace

    def start(self, *extra: str) -> Operator:
        """Start it with fast test intervals; `extra` flags are added (and win)."""
        script = Path(sys.executable).parent / "moeserve-operator"
        assert script.is_file(), f"{script} missing: pip install -e '.[operator]' into this environment"
        argv = [
            str(script),
            f"--namespace={self.namespace}",
            "--reconcile-interval=2",
            "--dashboard-retry-max=4",
            "--dashboard-timeout=2",
            *extra,
        ]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        self.supervisor.start("operator", argv, env=env)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies or the OOM killer strikes."""
        (record,) = self.supervisor.records()
        os.killpg(record.pid, signal.SIGKILL)
        self.supervisor.stop_all()  # reaps it

    def stop(self) -> None:
        self.supervisor.stop_all()

    def log(self) -> str:
        return (self.supervisor.log_dir / "operator.log").read_text(errors="replace")


@dataclass
class Installed:
    namespace: str
    kubeconfig: Path
    """The chart ServiceAccount's kubeconfig."""


def install_chart(plane: ControlPlane, core: Any) -> Installed:
    namespace = f"moe-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    helm(
        plane.kubeconfig,
        "install",
        RELEASE,
        str(CHART),
        f"--namespace={namespace}",
        "--set=operator.logLevel=DEBUG",
    )
    wait_until(
        "the chart's ServiceAccount",
        lambda: core.read_namespaced_service_account(SERVICE_ACCOUNT, namespace),
        timeout_s=30,
        ignore=(client.ApiException,),
    )
    return Installed(namespace, plane.service_account_kubeconfig(namespace, SERVICE_ACCOUNT))


def uninstall_chart(plane: ControlPlane, core: Any, installed: Installed) -> None:
    helm(plane.kubeconfig, "uninstall", RELEASE, f"--namespace={installed.namespace}", check=False)
    core.delete_namespace(installed.namespace)


def apply(kubectl: Kubectl, tmp_path: Path, namespace: str, manifest: Json, check: bool = True) -> Any:
    path = tmp_path / f"{manifest['metadata']['name']}-{uuid.uuid4().hex[:4]}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return kubectl("apply", "-n", namespace, "-f", str(path), check=check)


def wait_running(
    cluster: Cluster, namespace: str, name: str, pods: int, timeout_s: float = 60
) -> dict[str, Json]:
    def ready() -> dict[str, Json]:
        found = cluster.pods(namespace, name)
        return found if len(found) == pods and running(found) else {}

    result: dict[str, Json] = wait_until(f"{pods} Running pods of {name}", ready, timeout_s=timeout_s)
    return result
