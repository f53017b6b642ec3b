"""The test control plane behaves like a real cluster: scheduling onto fake GPU nodes, CRDs with a
status subresource, RBAC, and garbage collection through owner references.

These tests check the harness that the operator's k8s tests rely on, not moeserve itself.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from kubernetes import client

from tests.controlplane import DEFAULT_NODES, GPU_RESOURCE, RACK_LABEL, ZONE_LABEL, ControlPlane
from tests.controlplane.waiting import wait_until

pytestmark = pytest.mark.k8s

CRD_GROUP = "test.moeserve.io"
CRD_PLURAL = "widgets"


# The client's models type every field Optional; the tests hold API handles and answers as Any.

# -- builders ------------------------------------------------------------------------------------


def gpu_container(gpus: int) -> client.V1Container:
    resources = client.V1ResourceRequirements(limits={GPU_RESOURCE: str(gpus), "cpu": "1", "memory": "1Gi"})
    return client.V1Container(
        name="worker", image="registry.invalid/moeserve-worker:test", resources=resources
    )


def gpu_deployment(name: str, replicas: int, gpus_per_pod: int) -> client.V1Deployment:
    labels = {"app": name}
    template = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=labels),
        spec=client.V1PodSpec(containers=[gpu_container(gpus_per_pod)]),
    )
    spec = client.V1DeploymentSpec(
        replicas=replicas, selector=client.V1LabelSelector(match_labels=labels), template=template
    )
    return client.V1Deployment(metadata=client.V1ObjectMeta(name=name), spec=spec)


def widget_crd() -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": {
            "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{CRD_PLURAL}.{CRD_GROUP}"},
        "spec": {
            "group": CRD_GROUP,
            "scope": "Namespaced",
            "names": {"plural": CRD_PLURAL, "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                }
            ],
        },
    }


def config_map(name: str, owner: Any = None) -> client.V1ConfigMap:
    refs = None
    if owner is not None:
        refs = [
            client.V1OwnerReference(
                api_version="v1", kind="ConfigMap", name=owner.metadata.name, uid=owner.metadata.uid
            )
        ]
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, owner_references=refs), data={"k": "v"})


def _status_code(call: Any) -> int | None:
    try:
        call()
    except client.ApiException as err:
        return int(err.status)
    return None


# -- tests ---------------------------------------------------------------------------------------


def test_kubectl_lists_the_fake_gpu_nodes_ready(kubectl: Any) -> None:
    nodes = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    assert set(by_name) == {node.name for node in DEFAULT_NODES}
    for spec in DEFAULT_NODES:
        node = by_name[spec.name]
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", node["status"]["conditions"]
        assert node["status"]["allocatable"][GPU_RESOURCE] == "8"
        assert node["metadata"]["labels"][ZONE_LABEL] == spec.zone
        assert node["metadata"]["labels"][RACK_LABEL] == spec.rack
    table = kubectl("get", "nodes").stdout
    for node in DEFAULT_NODES:
        assert re.search(rf"^{node.name}\s+Ready\s", table, re.MULTILINE), table


def test_gpu_deployment_gets_running_pods_on_fake_nodes(k8s_client: client.ApiClient, namespace: str) -> None:
    apps: Any = client.AppsV1Api(k8s_client)
    core: Any = client.CoreV1Api(k8s_client)
    apps.create_namespaced_deployment(namespace, gpu_deployment("gpu-workers", replicas=3, gpus_per_pod=4))

    def running_pods() -> list[Any]:
        pods = core.list_namespaced_pod(namespace, label_selector="app=gpu-workers").items
        running = [p for p in pods if p.status.phase == "Running"]
        return running if len(running) == 3 else []

    pods = wait_until("3 Running GPU pods", running_pods, timeout_s=60)
    assert {p.spec.node_name for p in pods} <= {node.name for node in DEFAULT_NODES}
    assert all(p.status.pod_ip for p in pods)
    wait_until(
        "Deployment available",
        lambda: (
            apps.read_namespaced_deployment(name="gpu-workers", namespace=namespace).status.available_replicas
            == 3
        ),
        timeout_s=60,
    )


def test_pod_wanting_more_gpus_than_any_node_stays_pending(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    core: Any = client.CoreV1Api(k8s_client)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="too-big"), spec=client.V1PodSpec(containers=[gpu_container(9)])
    )
    core.create_namespaced_pod(namespace, pod)

    def unschedulable() -> Any:
        conditions = core.read_namespaced_pod("too-big", namespace).status.conditions or []
        return next((c for c in conditions if c.type == "PodScheduled" and c.status == "False"), None)

    condition = wait_until("PodScheduled=False", unschedulable, timeout_s=60)
    assert condition.reason == "Unschedulable"
    assert f"Insufficient {GPU_RESOURCE}" in condition.message
    current = core.read_namespaced_pod("too-big", namespace)
    assert current.status.phase == "Pending" and current.spec.node_name is None


def test_crd_custom_resource_round_trips_with_status_subresource(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    extensions: Any = client.ApiextensionsV1Api(k8s_client)
    custom: Any = client.CustomObjectsApi(k8s_client)
    name = f"{CRD_PLURAL}.{CRD_GROUP}"
    if _status_code(lambda: extensions.read_custom_resource_definition(name)) == 404:
        extensions.create_custom_resource_definition(widget_crd())

    def established() -> bool:
        conditions = extensions.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_until("CRD Established", established, timeout_s=30)
    args = (CRD_GROUP, "v1", namespace, CRD_PLURAL)
    body = {
        "apiVersion": f"{CRD_GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": {"size": 3},
        "status": {"phase": "ignored-on-create"},
    }
    created = wait_until(
        "Widget created",
        lambda: custom.create_namespaced_custom_object(*args, body),
        30,
        ignore=(client.ApiException,),
    )
    assert "status" not in created, "status must be dropped on create when the subresource is enabled"

    patched = custom.patch_namespaced_custom_object_status(*args, "w", {"status": {"phase": "Ready"}})
    assert patched["status"] == {"phase": "Ready"}
    assert patched["metadata"]["generation"] == created["metadata"]["generation"]

    custom.patch_namespaced_custom_object(*args, "w", {"spec": {"size": 5}, "status": {"phase": "ignored"}})
    fetched = custom.get_namespaced_custom_object(*args, "w")
    assert fetched["spec"] == {"size": 5}
    assert fetched["status"] == {"phase": "Ready"}
    assert fetched["metadata"]["generation"] == created["metadata"]["generation"] + 1


def test_service_account_without_rights_is_forbidden(
    k8s_cluster: ControlPlane, k8s_client: client.ApiClient, kubectl: Any, namespace: str
) -> None:
    core: Any = client.CoreV1Api(k8s_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody"))
    )
    sa_kubeconfig = k8s_cluster.service_account_kubeconfig(namespace, "nobody")

    denied = kubectl("get", "pods", "-n", namespace, kubeconfig=sa_kubeconfig, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and f"system:serviceaccount:{namespace}:nobody" in denied.stderr

    rbac: Any = client.RbacAuthorizationV1Api(k8s_client)
    role = client.V1Role(
        metadata=client.V1ObjectMeta(name="pod-reader"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"])],
    )
    rbac.create_namespaced_role(namespace, role)
    binding = client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="nobody-reads-pods"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="nobody", namespace=namespace)],
    )
    rbac.create_namespaced_role_binding(namespace, binding)
    wait_until(
        "RoleBinding takes effect",
        lambda: (
            kubectl("get", "pods", "-n", namespace, kubeconfig=sa_kubeconfig, check=False).returncode == 0
        ),
        timeout_s=30,
    )
    still_denied = kubectl("get", "secrets", "-n", namespace, kubeconfig=sa_kubeconfig, check=False)
    assert "Forbidden" in still_denied.stderr


def test_deleting_an_owner_garbage_collects_its_children(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    core: Any = client.CoreV1Api(k8s_client)
    parent = core.create_namespaced_config_map(namespace, config_map("parent"))
    children = [f"child-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    for child in children:
        core.create_namespaced_config_map(namespace, config_map(child, owner=parent))

    core.delete_namespaced_config_map("parent", namespace, propagation_policy="Background")

    def children_gone() -> bool:
        return all(
            _status_code(lambda c=c: core.read_namespaced_config_map(c, namespace)) == 404 for c in children
        )

    wait_until("children garbage-collected", children_gone, timeout_s=60)
