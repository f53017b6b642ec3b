"""Kubernetes objects of one MoEService, as pure functions of its owner identity and parsed spec.

Every builder returns a plain manifest (dict) with the `moeserve.io/service` and `moeserve.io/role`
labels and a controller owner reference to the MoEService, so garbage collection removes it with its
owner. Nothing here talks to the API server; `reconcile.py` decides what to create, patch or delete.

What a MoEService becomes, and why bare pods:
- Ray head: Pod `<name>-head` and Service `<name>-head` (GCS 6379, dashboard 8265, Serve gRPC). A bare
  Pod, not a one-replica Deployment or StatefulSet: a Ray cluster lives and dies with its head (the
  GCS state is in memory), so a new head needs new worker groups. Worker pods record the uid of the
  head pod they joined; a controller that silently replaced the head would leave them attached to a
  cluster that no longer exists, while the operator replaces head and workers together.
- Worker groups `attention` and `expert`: bare Pods `<name>-<role>-<i>` for i < replicas x ranks, each
  one Ray node offering one unit of the Ray resource `moeserve_<role>` (one rank). Not a StatefulSet or
  Deployment: a torch.distributed world cannot lose a member and carry on, so a lost pod restarts the
  whole group (delete all, then create all), which a StatefulSet (re-creates just the lost ordinal) or
  a Deployment (replaces one pod under a random name) would fight. Deterministic names also make
  creation idempotent: the API server refuses a second pod of the same name, so an operator restarted
  at any point cannot make duplicates. restartPolicy Never: the operator, not the kubelet, decides
  when a Ray node starts again.
- ConfigMap `<name>-serve-config`: the ServeAppConfig (the application's `args`) and the Serve deploy
  document that the operator PUTs to Ray's REST API; the head mounts it for inspection.
- Service `<name>`: the client-facing gRPC endpoint, Ray Serve's gRPC proxy on the head
  (`proxy_location: HeadOnly`).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from moeserve import contract
from moeserve.operator.spec import MoEServiceSpec, serve_app_config

Manifest = dict[str, Any]
Role = Literal["attention", "expert"]
WORKER_ROLES: tuple[Role, ...] = (contract.ROLE_ATTENTION, contract.ROLE_EXPERT)
GPU_RESOURCE = "nvidia.com/gpu"
RAY_RESOURCES: dict[str, str] = {
    contract.ROLE_ATTENTION: contract.RAY_RESOURCE_ATTENTION,
    contract.ROLE_EXPERT: contract.RAY_RESOURCE_EXPERT,
}


@dataclass(frozen=True)
class Owner:
    """The MoEService that owns every object built here."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
            "kind": contract.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class WorkerGroup:
    role: Role
    size: int
    """Pods in the group: replicas x ranks."""
    template: Manifest
    """The pod every member is made from (no name or index yet); carries its template hash."""


@dataclass(frozen=True)
class DesiredState:
    config_map: Manifest
    services: tuple[Manifest, ...]
    head: Manifest
    workers: tuple[WorkerGroup, ...]


# -- names and labels -----------------------------------------------------------------------------


def head_name(service: str) -> str:
    return f"{service}-head"


def worker_name(service: str, role: str, index: int) -> str:
    return f"{service}-{role}-{index}"


def config_map_name(service: str) -> str:
    return f"{service}-serve-config"


def auth_secret_name(service: str) -> str:
    return f"{service}-ray-auth"


def endpoint(owner: Owner, spec: MoEServiceSpec) -> str:
    """host:port of the client Service, as clients inside the cluster dial it."""
    return f"{owner.name}.{owner.namespace}.svc:{spec.serving.grpc_port}"


def labels(service: str, role: str | None = None) -> dict[str, str]:
    out = {contract.LABEL_SERVICE: service, contract.LABEL_MANAGED_BY: contract.MANAGED_BY}
    if role is not None:
        out[contract.LABEL_ROLE] = role
    return out


def _metadata(
    owner: Owner, name: str, role: str | None, annotations: dict[str, str] | None = None
) -> Manifest:
    meta: Manifest = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner.name, role),
        "ownerReferences": [owner.reference()],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


# -- the Serve application ------------------------------------------------------------------------


def serve_application(spec: MoEServiceSpec) -> Manifest:
    """One entry of the deploy document's `applications`; `args` is a validated ServeAppConfig."""
    return {
        "name": contract.SERVE_APP_NAME,
        "route_prefix": None,
        "import_path": contract.SERVE_APP_IMPORT_PATH,
        "args": serve_app_config(spec).to_dict(),
    }


def serve_deploy_document(spec: MoEServiceSpec) -> Manifest:
    """The body of `PUT /api/serve/applications/`; no application at all when scaled to zero."""
    return {
        "proxy_location": "HeadOnly",
        "grpc_options": {
            "port": spec.serving.grpc_port,
            "grpc_servicer_functions": list(contract.SERVE_GRPC_SERVICER_FUNCTIONS),
        },
        "applications": [serve_application(spec)] if spec.replicas > 0 else [],
    }


def config_map(owner: Owner, spec: MoEServiceSpec) -> Manifest:
    document = serve_deploy_document(spec)
    data = {contract.SERVE_DEPLOY_KEY: _json(document)}
    if document["applications"]:
        data[contract.SERVE_CONFIG_KEY] = _json(document["applications"][0]["args"])
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, config_map_name(owner.name), None),
        "data": data,
    }


def auth_secret(owner: Owner, token: str) -> Manifest:
    """The Ray cluster's authentication token. Created once with a fresh random token and never
    rewritten (pods and the operator read it); deleted with the MoEService."""
    encoded = base64.b64encode(token.encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(owner, auth_secret_name(owner.name), None),
        "type": "Opaque",
        "data": {contract.RAY_AUTH_SECRET_KEY: encoded},
    }


def auth_token(secret: Mapping[str, Any]) -> str:
    """The token an auth Secret holds."""
    return base64.b64decode(secret["data"][contract.RAY_AUTH_SECRET_KEY]).decode()


def _ray_auth_env(owner: Owner) -> list[Manifest]:
    """Token authentication on, with the MoEService's token, for every Ray process of the pod."""
    ref = {"name": auth_secret_name(owner.name), "key": contract.RAY_AUTH_SECRET_KEY}
    return [
        {"name": contract.ENV_RAY_AUTH_MODE, "value": "token"},
        {"name": contract.ENV_RAY_AUTH_TOKEN, "valueFrom": {"secretKeyRef": ref}},
    ]


# -- Services -------------------------------------------------------------------------------------


def head_service(owner: Owner, spec: MoEServiceSpec) -> Manifest:
    """What workers (GCS), the operator (dashboard) and the client Service reach the head through."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, head_name(owner.name), contract.ROLE_HEAD),
        "spec": {
            "type": "ClusterIP",
            "selector": labels(owner.name, contract.ROLE_HEAD),
            # Workers must reach the GCS before the head's readiness probe (the dashboard) passes.
            "publishNotReadyAddresses": True,
            "ports": [_service_port(name, port) for name, port in _head_ports(spec)],
        },
    }


def client_service(owner: Owner, spec: MoEServiceSpec) -> Manifest:
    """The gRPC endpoint clients use: Ray Serve's gRPC proxy on the head."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name, None),
        "spec": {
            "type": "ClusterIP",
            "selector": labels(owner.name, contract.ROLE_HEAD),
            "ports": [_service_port(contract.GRPC_PORT_NAME, spec.serving.grpc_port)],
        },
    }


def _head_ports(spec: MoEServiceSpec) -> list[tuple[str, int]]:
    return [
        (contract.RAY_GCS_PORT_NAME, contract.RAY_GCS_PORT),
        (contract.RAY_DASHBOARD_PORT_NAME, contract.RAY_DASHBOARD_PORT),
        (contract.GRPC_PORT_NAME, spec.serving.grpc_port),
    ]


def _service_port(name: str, port: int) -> Manifest:
    return {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}


# -- pods -----------------------------------------------------------------------------------------


def _metrics_export_flag(spec: MoEServiceSpec) -> str:
    """Every pod's Ray metrics agent serves Prometheus text here: Ray's own metrics and the attention
    ranks' `ray_moeserve_*` engine metrics (`serve_metrics.py`)."""
    return f"--metrics-export-port={spec.serving.metrics_port}"


def head_pod(owner: Owner, spec: MoEServiceSpec) -> Manifest:
    command = [
        "ray",
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--port={contract.RAY_GCS_PORT}",
        "--dashboard-host=0.0.0.0",
        f"--dashboard-port={contract.RAY_DASHBOARD_PORT}",
        "--num-gpus=0",  # ranks ask for GPUs and moeserve_* resources, which only workers offer
        _metrics_export_flag(spec),
    ]
    ports = [*_head_ports(spec), (contract.METRICS_PORT_NAME, spec.serving.metrics_port)]
    container = {
        "name": "ray-head",
        "image": spec.image,
        "command": command,
        "env": _ray_auth_env(owner),
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports],
        "resources": _resources(spec.head_resources, gpus=0),
        "readinessProbe": {
            "httpGet": {"path": "/api/gcs_healthz", "port": contract.RAY_DASHBOARD_PORT_NAME},
            "periodSeconds": 5,
            "timeoutSeconds": 5,
        },
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "serve-config", "mountPath": contract.SERVE_CONFIG_DIR, "readOnly": True},
        ],
    }
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "serve-config", "configMap": {"name": config_map_name(owner.name)}},
    ]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(owner, head_name(owner.name), contract.ROLE_HEAD),
        "spec": {**_pod_basics([container], volumes), **_scheduling(spec, group_labels=None)},
    }
    return _with_template_hash(pod)


def worker_template(owner: Owner, spec: MoEServiceSpec, role: Role) -> Manifest:
    """The pod every member of a worker group is made from; `worker_pod` names and indexes it."""
    group = spec.group(role)
    head_address = f"{head_name(owner.name)}.{owner.namespace}.svc:{contract.RAY_GCS_PORT}"
    command = [
        "ray",
        "start",
        "--block",
        "--disable-usage-stats",
        f"--address={head_address}",
        f"--num-gpus={group.gpus_per_rank}",
        f"--resources={json.dumps({RAY_RESOURCES[role]: 1})}",
        _metrics_export_flag(spec),
    ]
    container: Manifest = {
        "name": f"ray-{role}",
        "image": spec.image,
        "command": command,
        "env": _ray_auth_env(owner),
        "resources": _resources(group.resources, gpus=group.gpus_per_rank),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        "ports": [
            {
                "name": contract.METRICS_PORT_NAME,
                "containerPort": spec.serving.metrics_port,
                "protocol": "TCP",
            }
        ],
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": owner.namespace,
            "labels": labels(owner.name, role),
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            **_pod_basics([container], [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]),
            **_scheduling(spec, group_labels=labels(owner.name, role)),
        },
    }
    return _with_template_hash(pod)


def worker_pod(template: Manifest, service: str, role: str, index: int, head_uid: str) -> Manifest:
    """Member `index` of a worker group, bound to the head pod `head_uid`. It records the group's
    size (`moeserve.io/group-size`) only once the whole group exists (see groups.py)."""
    pod = copy.deepcopy(template)
    meta = pod["metadata"]
    meta["name"] = worker_name(service, role, index)
    meta["labels"][contract.LABEL_INDEX] = str(index)
    meta["annotations"][contract.ANNOTATION_HEAD_UID] = head_uid
    return pod


def template_hash(pod: Mapping[str, Any]) -> str:
    return str(pod["metadata"]["annotations"][contract.ANNOTATION_TEMPLATE_HASH])


def _with_template_hash(pod: Manifest) -> Manifest:
    digest = hashlib.sha256(_json(pod).encode()).hexdigest()[:16]
    pod["metadata"].setdefault("annotations", {})[contract.ANNOTATION_TEMPLATE_HASH] = digest
    return pod


def _pod_basics(containers: list[Manifest], volumes: list[Manifest]) -> Manifest:
    return {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "containers": containers,
        "volumes": volumes,
    }


def _resources(resources: Mapping[str, Any], gpus: int) -> Manifest:
    out: Manifest = {key: dict(resources[key]) for key in ("requests", "limits") if resources.get(key)}
    if gpus > 0:
        for key in ("requests", "limits"):
            out.setdefault(key, {})[GPU_RESOURCE] = str(gpus)
    return out


def _scheduling(spec: MoEServiceSpec, group_labels: dict[str, str] | None) -> Manifest:
    """nodeSelector, tolerations, affinity and priority from the spec; for a worker group
    (`group_labels`), also topology spread or packing over spec.scheduling.topology_key."""
    sched = spec.scheduling
    out: Manifest = {}
    if sched.node_selector:
        out["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        out["tolerations"] = [dict(t) for t in sched.tolerations]
    if sched.priority_class_name:
        out["priorityClassName"] = sched.priority_class_name
    affinity = copy.deepcopy(dict(sched.affinity))
    if group_labels is not None and sched.policy == "Spread":
        # Soft: GPUs are scarce, so an uneven spread beats a rank left Pending.
        out["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": sched.topology_key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": dict(group_labels)},
            }
        ]
    elif group_labels is not None:
        term = {
            "weight": 100,
            "podAffinityTerm": {
                "topologyKey": sched.topology_key,
                "labelSelector": {"matchLabels": dict(group_labels)},
            },
        }
        preferred = affinity.setdefault("podAffinity", {}).setdefault(
            "preferredDuringSchedulingIgnoredDuringExecution", []
        )
        preferred.append(term)
    if affinity:
        out["affinity"] = affinity
    return out


# -- everything -----------------------------------------------------------------------------------


def desired_state(owner: Owner, spec: MoEServiceSpec) -> DesiredState:
    """All objects of `owner`. Raises ServeConfigError when the spec is no valid ServeAppConfig."""
    serve_app_config(spec, replicas=max(spec.replicas, 1))  # validate even when scaled to zero
    workers = tuple(
        WorkerGroup(role, spec.group_size(role), worker_template(owner, spec, role)) for role in WORKER_ROLES
    )
    return DesiredState(
        config_map=config_map(owner, spec),
        services=(head_service(owner, spec), client_service(owner, spec)),
        head=head_pod(owner, spec),
        workers=workers,
    )


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)
