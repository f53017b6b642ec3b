"""What the operator's pods need to run for real, checked on the control plane with kwok nodes.

A local fake of Ray's Serve REST API (tests/fake_ray_dashboard.py) stands in for the heads'
dashboards (`--dashboard-url-template`), so the status and the client Service can be driven through
every application state. The real kube-scheduler places the pods on the fake nodes (zones, racks,
GPUs) and the real EndpointSlice controller decides what the client Service routes to.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from moeserve import contract
from moeserve.serve_config import ServeAppConfig
from tests.controlplane import DEFAULT_NODES, GPU_RESOURCE, ZONE_LABEL, ControlPlane
from tests.controlplane.waiting import wait_until
from tests.fake_ray_dashboard import FakeDashboard
from tests.k8s.operator_support import (
    Cluster,
    Installed,
    Json,
    Kubectl,
    Operator,
    apply,
    condition,
    install_chart,
    uids,
    uninstall_chart,
    wait_running,
)
from tests.moeservices import moeservice

pytestmark = pytest.mark.k8s

MODEL_RETRY_S = 30  # the window in which the status must say ModelUnavailable
CPU_ONLY: dict[str, Any] = {
    "model": {"path": "/models/tiny", "volume": {"hostPath": {"path": "/var/lib/models/tiny"}}},
    "attention": {"ranks": 1, "gpusPerRank": 0, "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
    "experts": {"ranks": 2, "gpusPerRank": 0, "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
}


@pytest.fixture(scope="module")
def cluster(k8s_client: client.ApiClient) -> Cluster:
    return Cluster(k8s_client)


@pytest.fixture(scope="module")
def shared_dashboard() -> Iterator[FakeDashboard]:
    fake = FakeDashboard()
    yield fake
    fake.close()


@pytest.fixture
def dashboard(shared_dashboard: FakeDashboard) -> FakeDashboard:
    """The module's fake dashboard, with no application deployed (every head's URL leads to it)."""
    shared_dashboard.applications.clear()
    shared_dashboard.status_after_put = "DEPLOYING"
    return shared_dashboard


@pytest.fixture(scope="module")
def installed(k8s_cluster: ControlPlane, k8s_client: client.ApiClient) -> Iterator[Installed]:
    core = client.CoreV1Api(k8s_client)
    release = install_chart(k8s_cluster, core)
    yield release
    uninstall_chart(k8s_cluster, core, release)


@pytest.fixture(scope="module")
def ns(
    installed: Installed, shared_dashboard: FakeDashboard, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    operator = Operator(tmp_path_factory.mktemp("operator"), installed.kubeconfig, installed.namespace)
    url = shared_dashboard.url
    operator.start(f"--dashboard-url-template={url}", f"--model-retry-interval={MODEL_RETRY_S}")
    yield installed.namespace
    operator.stop()
    assert "Traceback" not in operator.log() and "forbidden" not in operator.log().lower(), operator.log()[
        -5000:
    ]


def set_app_status(dashboard: FakeDashboard, status: str) -> None:
    wait_until(
        "the Serve application deployed", lambda: contract.SERVE_APP_NAME in dashboard.applications, 90
    )
    dashboard.applications[contract.SERVE_APP_NAME]["status"] = status


def serve_label(cluster: Cluster, ns: str, name: str) -> str | None:
    head = cluster.pods(ns, name, "head")[f"{name}-head"]
    label: str | None = head["metadata"]["labels"].get(contract.LABEL_SERVE_READY)
    return label


def test_the_client_service_routes_only_to_a_head_whose_application_runs(
    ns: str, cluster: Cluster, dashboard: FakeDashboard, kubectl: Kubectl, tmp_path: Path
) -> None:
    name = "routed"
    apply(kubectl, tmp_path, ns, moeservice(name, **CPU_ONLY))
    pods = wait_running(cluster, ns, name, 4, timeout_s=120)
    for pod in pods.values():  # CPU-only: nothing asks for a GPU, and the CPU requests are the spec's
        assert GPU_RESOURCE not in json.dumps(pod["spec"]), pod["metadata"]["name"]
        if "head" not in pod["metadata"]["name"]:
            assert pod["spec"]["containers"][0]["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}}
    set_app_status(dashboard, "DEPLOYING")
    args = ServeAppConfig.from_dict(dashboard.puts[-1]["applications"][0]["args"])
    assert (args.gpus_per_attention_rank, args.gpus_per_expert_rank) == (0.0, 0.0)  # gloo on CPU
    wait_until(
        "Ready=False ServeApplicationDeploying",
        lambda: condition(cluster.moe(ns, name), "Ready").get("reason") == "ServeApplicationDeploying",
        90,
    )
    assert serve_label(cluster, ns, name) is None
    head_ip = cluster.pods(ns, name, "head")[f"{name}-head"]["status"]["podIP"]
    # the head Service publishes the head at once (workers reach the GCS through it), the client
    # Service does not
    wait_until(
        "the head Service's endpoint",
        lambda: cluster.endpoint_addresses(ns, f"{name}-head") == {(f"{name}-head", head_ip)},
        90,
    )
    assert cluster.endpoint_addresses(ns, name) == set()
    # the client Service carries gRPC and the OpenAI HTTP API, the head's named container ports
    client = json.loads(kubectl("get", "service", name, "-n", ns, "-o", "json").stdout)
    assert [(p["name"], p["port"], p["targetPort"]) for p in client["spec"]["ports"]] == [
        ("grpc", 9000, "grpc"),
        ("http", 8000, "http"),
    ]

    set_app_status(dashboard, "RUNNING")

    def ready() -> Json:
        moe = cluster.moe(ns, name)
        return moe if condition(moe, "Ready").get("status") == "True" else {}

    moe = wait_until("Ready=True", ready, 90)
    assert (moe["status"]["readyReplicas"], moe["status"]["endpoint"]) == (1, f"{name}.{ns}.svc:9000")
    assert serve_label(cluster, ns, name) == "true"
    wait_until(
        "the client Service routes to the head",
        lambda: cluster.endpoint_addresses(ns, name) == {(f"{name}-head", head_ip)},
        90,
    )

    set_app_status(dashboard, "UNHEALTHY")
    wait_until("the serve label removed", lambda: serve_label(cluster, ns, name) is None, 90)
    wait_until(
        "the client Service has no endpoint", lambda: cluster.endpoint_addresses(ns, name) == set(), 90
    )
    wait_until(  # written in the same pass as the label, just after it
        "Degraded=True ServeApplicationFailed",
        lambda: condition(cluster.moe(ns, name), "Degraded").get("reason") == "ServeApplicationFailed",
        90,
    )
    kubectl("delete", "moe", name, "-n", ns)


def test_a_pod_without_its_model_says_model_unavailable_then_its_group_checks_again(
    ns: str, cluster: Cluster, dashboard: FakeDashboard, kubectl: Kubectl, tmp_path: Path
) -> None:
    name = "modelless"
    apply(kubectl, tmp_path, ns, moeservice(name, **CPU_ONLY))
    pods = wait_running(cluster, ns, name, 4, timeout_s=120)
    experts = uids(cluster.pods(ns, name, "expert"))
    pod = pods[f"{name}-expert-1"]
    (check,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "model-check"]
    assert check["volumeMounts"] == [{"name": "model", "mountPath": "/models/tiny", "readOnly": True}]
    message = "model unavailable at /models/tiny: no config.json readable by uid 1000"
    # what the kubelet reports when model-check exits 1 in a restartPolicy: Never pod
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    terminated = {
        "exitCode": 1,
        "reason": "Error",
        "message": message + "\n",
        "startedAt": now,
        "finishedAt": now,
    }
    # kwok already reported every init container done: only model-check's outcome changes (the API
    # server refuses to turn a terminated container back into a waiting one)
    init = [
        {**c, "ready": False, "state": {"terminated": terminated}} if c["name"] == "model-check" else c
        for c in pod["status"]["initContainerStatuses"]
    ]
    cluster.patch_status(
        ns,
        f"{name}-expert-1",
        {
            "phase": "Failed",
            "initContainerStatuses": init,
            "conditions": [{"type": "Ready", "status": "False", "reason": "PodFailed"}],
        },
    )
    expected = f"expert pod {name}-expert-1: {message} (checked again every {MODEL_RETRY_S} s)"

    def unavailable() -> Json:
        moe = cluster.moe(ns, name)
        return moe if condition(moe, "Degraded").get("reason") == "ModelUnavailable" else {}

    moe = wait_until("Degraded=True ModelUnavailable", unavailable, 90, interval_s=0.1)
    assert condition(moe, "Degraded") | {"lastTransitionTime": None, "observedGeneration": None} == {
        "type": "Degraded",
        "status": "True",
        "reason": "ModelUnavailable",
        "message": expected,
        "lastTransitionTime": None,
        "observedGeneration": None,
    }
    assert condition(moe, "Ready")["status"] == "False" and moe["status"]["phase"] == "Degraded"
    wait_until(
        "a ModelUnavailable Warning event",
        lambda: any(
            e["reason"] == "ModelUnavailable" and e["type"] == "Warning" for e in cluster.events(ns, name)
        ),
        90,
    )

    def rechecked() -> bool:
        now = cluster.pods(ns, name, "expert")
        return len(now) == 2 and not set(uids(now).values()) & set(experts.values())

    wait_until("the expert group restarted to check again", rechecked, 90)
    restarts = [e["message"] for e in cluster.events(ns, name) if e["reason"] == "WorkerGroupRestart"]
    assert any(f"pod {name}-expert-1 failed: {message}" in m for m in restarts), restarts
    wait_running(cluster, ns, name, 4, timeout_s=120)
    wait_until(
        "Degraded=False once the model is there",
        lambda: condition(cluster.moe(ns, name), "Degraded").get("status") == "False",
        90,
    )
    kubectl("delete", "moe", name, "-n", ns)


def test_the_ranks_of_an_instance_share_a_node_and_instances_take_different_zones(
    ns: str, cluster: Cluster, dashboard: FakeDashboard, kubectl: Kubectl, tmp_path: Path
) -> None:
    name = "packed"
    spec: dict[str, Any] = {"replicas": 2, "scheduling": {"topologyKey": ZONE_LABEL}}
    apply(kubectl, tmp_path, ns, moeservice(name, **spec))
    pods = wait_running(cluster, ns, name, 9, timeout_s=120)
    zones = {node.name: node.zone for node in DEFAULT_NODES}
    nodes_of: dict[str, set[str]] = {}
    for pod in pods.values():
        instance = pod["metadata"]["labels"].get(contract.LABEL_INSTANCE)
        if instance is not None:
            nodes_of.setdefault(instance, set()).add(pod["spec"]["nodeName"])
    assert set(nodes_of) == {"0", "1"}
    assert all(len(nodes) == 1 for nodes in nodes_of.values()), nodes_of  # 2 + 2 ranks, 8 GPUs a node
    (node_0,), (node_1,) = nodes_of["0"], nodes_of["1"]
    assert zones[node_0] != zones[node_1], nodes_of
    kubectl("delete", "moe", name, "-n", ns)
