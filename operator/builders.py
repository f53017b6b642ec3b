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
  (`proxy_location: HeadOnly`). It selects the head only while the head carries `moeserve.io/serve:
  "true"`, which the operator sets while Ray reports the Serve application RUNNING.

Every Ray pod mounts the model volume read-only at `spec.model.path` and first runs the init
container `model-check` (MODEL_CHECK_SCRIPT), which fails with a one-line termination message when
the checkpoint is not readable there; worker pods then wait in `wait-for-head` until the head's GCS
answers. Probes use Ray's unauthenticated health endpoints: the head is ready when its dashboard
answers `/api/gcs_healthz` (dashboard up and GCS alive), a worker when its dashboard agent answers
`/api/local_raylet_healthz` (its raylet is alive in the GCS, i.e. it joined).
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
HEAD_RAY_RESOURCE = "moeserve_head"
"""Offered by the head pod only. The Serve replicas (ingress, health, model-instance drivers) ask for
a sliver of it: with no resource at all Serve puts them on any node, and a replica on a worker pod
dies with that pod, so a stream in flight when a worker group restarts ended INTERNAL ("the actor
died") instead of UNAVAILABLE (found by the e2e tier). The head outlives worker-group restarts."""
SERVE_DEPLOYMENTS = ("InferenceIngress", "InstanceHealth", "ModelInstance")


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
    ranks: int
    """Ranks per model instance: member i belongs to instance i // ranks."""
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
        # Serve's proxies route only to applications with a route prefix: with None the gRPC proxy
        # answers every call NOT_FOUND ("Application metadata not set"), so the client Service
        # could never serve (found by the e2e tier, tests/e2e/test_moeserve.py).
        "route_prefix": "/",
        "import_path": contract.SERVE_APP_IMPORT_PATH,
        "args": serve_app_config(spec).to_dict(),
        "deployments": [
            {"name": name, "ray_actor_options": {"num_cpus": 0, "resources": {HEAD_RAY_RESOURCE: 0.001}}}
            for name in SERVE_DEPLOYMENTS
        ],
    }


def serve_deploy_document(spec: MoEServiceSpec) -> Manifest:
    """The body of `PUT /api/serve/applications/`; no application at all when scaled to zero."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": spec.serving.http_port},
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


def event(body: Mapping[str, Any], event_type: str, reason: str, message: str, now: str) -> Manifest:
    """A core/v1 Event about the MoEService `body` (what `kubectl describe moe` lists)."""
    meta = body["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
            "kind": contract.KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": event_type,
        "reason": reason,
        "message": message[:EVENT_MESSAGE_LIMIT],
        "source": {"component": contract.MANAGED_BY},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


EVENT_MESSAGE_LIMIT = 1024


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
    """The gRPC endpoint clients use: Ray Serve's gRPC proxy on a head whose application is RUNNING
    (the operator labels it; a head without the label has no endpoint here, so clients fail fast)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name, None),
        "spec": {
            "type": "ClusterIP",
            "selector": {
                **labels(owner.name, contract.ROLE_HEAD),
                contract.LABEL_SERVE_READY: contract.SERVE_READY,
            },
            "ports": [
                _service_port(contract.GRPC_PORT_NAME, spec.serving.grpc_port),
                _service_port(contract.HTTP_PORT_NAME, spec.serving.http_port),
            ],
        },
    }


def _head_ports(spec: MoEServiceSpec) -> list[tuple[str, int]]:
    return [
        (contract.RAY_GCS_PORT_NAME, contract.RAY_GCS_PORT),
        (contract.RAY_DASHBOARD_PORT_NAME, contract.RAY_DASHBOARD_PORT),
        (contract.GRPC_PORT_NAME, spec.serving.grpc_port),
        (contract.HTTP_PORT_NAME, spec.serving.http_port),
    ]


def _service_port(name: str, port: int) -> Manifest:
    return {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}


# -- pods -----------------------------------------------------------------------------------------

MODEL_CHECK_SCRIPT = """\
m="$MOESERVE_MODEL_PATH"
fail() {
  echo "model unavailable at $m: $1" >&2
  { echo "model unavailable at $m: $1" > "${MOESERVE_TERMINATION_LOG:-/dev/termination-log}"; } 2>/dev/null
  exit 1
}
[ -d "$m" ] || fail "no such directory (is the model volume bound and populated?)"
[ -r "$m/config.json" ] || fail "no config.json readable by uid $(id -u)"
[ -r "$m/model.safetensors" ] || [ -r "$m/model.safetensors.index.json" ] \\
  || fail "no model.safetensors or model.safetensors.index.json readable by uid $(id -u)"
echo "model found at $m"
"""
"""`sh -c` script of the `model-check` init container: what the checkpoint loader needs first
(loader.py, config.py). The path comes from the environment, never from the script's text."""

WAIT_FOR_HEAD_SCRIPT = """\
import os, sys, time, urllib.request
url, start, last = os.environ["MOESERVE_HEAD_HEALTH_URL"], time.monotonic(), 0.0
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            if answer.read().strip() == b"success":
                print(f"the Ray head answers at {url}", flush=True)
                sys.exit(0)
    except Exception as err:
        if time.monotonic() - last >= 30:
            print(f"waiting for the Ray head at {url}: {err}", flush=True)
            last = time.monotonic()
    time.sleep(2)
"""
"""`python -c` script of the workers' `wait-for-head` init container: `ray start --address` gives
up when the GCS is not there yet, which would fail (and restart) the whole group."""

PROBE_PERIOD_S = 5
LIVENESS_PERIOD_S = 10
LIVENESS_FAILURES = 6
"""A Ray node that does not answer for a minute is dead (a busy one still answers in time)."""


def _metrics_export_flag(spec: MoEServiceSpec) -> str:
    """Every pod's Ray metrics agent serves Prometheus text here: Ray's own metrics and the attention
    ranks' `ray_moeserve_*` engine metrics (`serve_metrics.py`)."""
    return f"--metrics-export-port={spec.serving.metrics_port}"


POD_IP_ENV = "MOESERVE_POD_IP"


def _ray_flags(spec: MoEServiceSpec) -> list[str]:
    return [
        "--block",
        "--disable-usage-stats",
        # The pod IP from the downward API (the kubelet expands $(VAR)): Ray's own guess needs a
        # default route and falls back to 127.0.0.1, which other pods cannot reach.
        f"--node-ip-address=$({POD_IP_ENV})",
        f"--dashboard-agent-listen-port={contract.RAY_AGENT_PORT}",
        _metrics_export_flag(spec),
    ]


def probes(path: str, port: str, spec: MoEServiceSpec) -> Manifest:
    """Startup, readiness and liveness probes of a Ray container on one of Ray's health endpoints."""
    action = {"httpGet": {"path": path, "port": port}, "timeoutSeconds": 5}
    startup_failures = max(1, -(-spec.probes.startup_s // PROBE_PERIOD_S))
    return {
        "startupProbe": {**action, "periodSeconds": PROBE_PERIOD_S, "failureThreshold": startup_failures},
        "readinessProbe": {**action, "periodSeconds": PROBE_PERIOD_S, "failureThreshold": 2},
        "livenessProbe": {
            **action,
            "periodSeconds": LIVENESS_PERIOD_S,
            "failureThreshold": LIVENESS_FAILURES,
        },
    }


def model_volume(spec: MoEServiceSpec) -> Manifest | None:
    """The pod volume holding the model, read-only where the source has a flag for it."""
    if spec.model.volume is None:
        return None
    ((source, fields_),) = spec.model.volume.items()
    body = dict(fields_)
    if source in ("persistentVolumeClaim", "nfs", "csi"):
        body["readOnly"] = True
    return {"name": contract.MODEL_VOLUME_NAME, source: body}


def _model_mounts(spec: MoEServiceSpec) -> list[Manifest]:
    if spec.model.volume is None:
        return []
    mount: Manifest = {"name": contract.MODEL_VOLUME_NAME, "mountPath": spec.model.path, "readOnly": True}
    if spec.model.sub_path:
        mount["subPath"] = spec.model.sub_path
    return [mount]


def _container_security() -> Manifest:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _image(spec: MoEServiceSpec) -> Manifest:
    out: Manifest = {"image": spec.image}
    if spec.image_pull_policy:
        out["imagePullPolicy"] = spec.image_pull_policy
    return out


def _model_check(spec: MoEServiceSpec) -> Manifest:
    return {
        "name": contract.MODEL_CHECK_CONTAINER,
        **_image(spec),
        "command": ["sh", "-c", MODEL_CHECK_SCRIPT],
        "env": [{"name": contract.ENV_MODEL_PATH, "value": spec.model.path}],
        "volumeMounts": _model_mounts(spec),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security(),
    }


def _ray_container(
    name: str, spec: MoEServiceSpec, command: list[str], env: list[Manifest], ports: list[tuple[str, int]]
) -> Manifest:
    pod_ip = {"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    return {
        "name": name,
        **_image(spec),
        "command": command,
        "env": [pod_ip, *env],
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, *_model_mounts(spec)],
        "securityContext": _container_security(),
    }


def _volumes(spec: MoEServiceSpec, *extra: Manifest) -> list[Manifest]:
    model = model_volume(spec)
    return [{"name": "dshm", "emptyDir": {"medium": "Memory"}}, *extra, *([model] if model else [])]


def head_pod(owner: Owner, spec: MoEServiceSpec) -> Manifest:
    command = [
        "ray",
        "start",
        "--head",
        f"--port={contract.RAY_GCS_PORT}",
        "--dashboard-host=0.0.0.0",
        f"--dashboard-port={contract.RAY_DASHBOARD_PORT}",
        "--num-gpus=0",  # ranks ask for GPUs and moeserve_* resources, which only workers offer
        f"--resources={json.dumps({HEAD_RAY_RESOURCE: 1})}",
        *_ray_flags(spec),
    ]
    ports = [
        *_head_ports(spec),
        (contract.RAY_AGENT_PORT_NAME, contract.RAY_AGENT_PORT),
        (contract.METRICS_PORT_NAME, spec.serving.metrics_port),
    ]
    container = _ray_container("ray-head", spec, command, _ray_auth_env(owner), ports)
    container["resources"] = _resources(spec.head_resources, gpus=0)
    container.update(probes(contract.RAY_GCS_HEALTH_PATH, contract.RAY_DASHBOARD_PORT_NAME, spec))
    container["volumeMounts"].append(
        {"name": "serve-config", "mountPath": contract.SERVE_CONFIG_DIR, "readOnly": True}
    )
    config = {"name": "serve-config", "configMap": {"name": config_map_name(owner.name)}}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(owner, head_name(owner.name), contract.ROLE_HEAD),
        "spec": {
            **_pod_basics([_model_check(spec)], [container], _volumes(spec, config)),
            **_scheduling(spec, worker=False),
        },
    }
    return _with_template_hash(pod)


def worker_template(owner: Owner, spec: MoEServiceSpec, role: Role) -> Manifest:
    """The pod every member of a worker group is made from; `worker_pod` names and indexes it."""
    group = spec.group(role)
    head = f"{head_name(owner.name)}.{owner.namespace}.svc"
    command = [
        "ray",
        "start",
        f"--address={head}:{contract.RAY_GCS_PORT}",
        f"--num-gpus={group.gpus_per_rank}",
        f"--resources={json.dumps({RAY_RESOURCES[role]: 1})}",
        *_ray_flags(spec),
    ]
    ports = [
        (contract.RAY_AGENT_PORT_NAME, contract.RAY_AGENT_PORT),
        (contract.METRICS_PORT_NAME, spec.serving.metrics_port),
    ]
    container = _ray_container(f"ray-{role}", spec, command, _ray_auth_env(owner), ports)
    container["resources"] = _resources(group.resources, gpus=group.gpus_per_rank)
    container.update(probes(contract.RAY_RAYLET_HEALTH_PATH, contract.RAY_AGENT_PORT_NAME, spec))
    health_url = f"http://{head}:{contract.RAY_DASHBOARD_PORT}{contract.RAY_GCS_HEALTH_PATH}"
    wait = {
        "name": contract.WAIT_FOR_HEAD_CONTAINER,
        **_image(spec),
        "command": ["python", "-c", WAIT_FOR_HEAD_SCRIPT],
        "env": [{"name": "MOESERVE_HEAD_HEALTH_URL", "value": health_url}],
        "securityContext": _container_security(),
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
            **_pod_basics([_model_check(spec), wait], [container], _volumes(spec)),
            **_scheduling(spec, worker=True, service=owner.name),
        },
    }
    return _with_template_hash(pod)


def worker_pod(group: WorkerGroup, service: str, index: int, head_uid: str) -> Manifest:
    """Member `index` of a worker group, bound to the head pod `head_uid`, labelled (and its Ray node
    labelled) with its model instance. It records the group's size (`moeserve.io/group-size`) only
    once the whole group exists (see groups.py)."""
    pod = copy.deepcopy(group.template)
    instance = str(index // group.ranks)
    meta = pod["metadata"]
    meta["name"] = worker_name(service, group.role, index)
    meta["labels"][contract.LABEL_INDEX] = str(index)
    meta["labels"][contract.LABEL_INSTANCE] = instance
    meta["annotations"][contract.ANNOTATION_HEAD_UID] = head_uid
    container = pod["spec"]["containers"][0]
    container["command"].append(f"--labels={contract.LABEL_INSTANCE}={instance}")
    return pod


def template_hash(pod: Mapping[str, Any]) -> str:
    return str(pod["metadata"]["annotations"][contract.ANNOTATION_TEMPLATE_HASH])


def _with_template_hash(pod: Manifest) -> Manifest:
    digest = hashlib.sha256(_json(pod).encode()).hexdigest()[:16]
    pod["metadata"].setdefault("annotations", {})[contract.ANNOTATION_TEMPLATE_HASH] = digest
    return pod


def _pod_basics(init: list[Manifest], containers: list[Manifest], volumes: list[Manifest]) -> Manifest:
    return {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # Ray never calls the Kubernetes API
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": init,
        "containers": containers,
        "volumes": volumes,
    }


def _resources(resources: Mapping[str, Any], gpus: int) -> Manifest:
    out: Manifest = {key: dict(resources[key]) for key in ("requests", "limits") if resources.get(key)}
    if gpus > 0:
        for key in ("requests", "limits"):
            out.setdefault(key, {})[GPU_RESOURCE] = str(gpus)
    return out


HOSTNAME_KEY = "kubernetes.io/hostname"
PACK_NODE_WEIGHT, PACK_DOMAIN_WEIGHT, SPREAD_WEIGHT = 100, 50, 20


def instance_affinity(spec: MoEServiceSpec, service: str) -> Manifest:
    """Pod (anti-)affinity of a worker pod that packs its model instance and spreads instances.

    The ranks of one instance exchange every MoE layer's all-to-all, so they prefer the node of the
    instance's other pods (both roles), then its topology_key domain (rack, zone); with packing
    Required they must share that domain. Pods of other instances are avoided in the domain (soft,
    weaker than packing): instances land apart, so a lost node or zone takes few instances along.
    One term serves every instance: `matchLabelKeys`/`mismatchLabelKeys` (Kubernetes >= 1.33) select
    on the pod's own `moeserve.io/instance` value. Ray's placement groups then pick which pods form
    an instance; the labels tell Kubernetes which pods should sit together.
    """
    key = spec.scheduling.topology_key
    ours = {"matchLabels": {contract.LABEL_SERVICE: service}}
    same = {"labelSelector": ours, "matchLabelKeys": [contract.LABEL_INSTANCE]}
    preferred = [{"weight": PACK_NODE_WEIGHT, "podAffinityTerm": {"topologyKey": HOSTNAME_KEY, **same}}]
    if key != HOSTNAME_KEY:
        preferred.append({"weight": PACK_DOMAIN_WEIGHT, "podAffinityTerm": {"topologyKey": key, **same}})
    affinity: Manifest = {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": preferred}}
    if spec.scheduling.packing == "Required":
        affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = [
            {"topologyKey": key, **same}
        ]
    others = {
        "matchLabels": {contract.LABEL_SERVICE: service},
        "matchExpressions": [{"key": contract.LABEL_INSTANCE, "operator": "Exists"}],
    }
    spread = {"topologyKey": key, "labelSelector": others, "mismatchLabelKeys": [contract.LABEL_INSTANCE]}
    affinity["podAntiAffinity"] = {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": SPREAD_WEIGHT, "podAffinityTerm": spread}
        ]
    }
    return affinity


def _scheduling(spec: MoEServiceSpec, worker: bool, service: str = "") -> Manifest:
    """nodeSelector, tolerations, affinity and priority from the spec; worker pods also get the
    instance packing terms (`instance_affinity`) merged into the spec's affinity."""
    sched = spec.scheduling
    out: Manifest = {}
    if sched.node_selector:
        out["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        out["tolerations"] = [dict(t) for t in sched.tolerations]
    if sched.priority_class_name:
        out["priorityClassName"] = sched.priority_class_name
    affinity = copy.deepcopy(dict(sched.affinity))
    if worker:
        for kind, terms in instance_affinity(spec, service).items():
            ours = affinity.setdefault(kind, {})
            for when, listed in terms.items():
                ours.setdefault(when, []).extend(listed)
    if affinity:
        out["affinity"] = affinity
    return out


# -- everything -----------------------------------------------------------------------------------


def desired_state(owner: Owner, spec: MoEServiceSpec) -> DesiredState:
    """All objects of `owner`. Raises ServeConfigError when the spec is no valid ServeAppConfig."""
    serve_app_config(spec, replicas=max(spec.replicas, 1))  # validate even when scaled to zero
    workers = tuple(
        WorkerGroup(role, spec.group_size(role), spec.group(role).ranks, worker_template(owner, spec, role))
        for role in WORKER_ROLES
    )
    return DesiredState(
        config_map=config_map(owner, spec),
        services=(head_service(owner, spec), client_service(owner, spec)),
        head=head_pod(owner, spec),
        workers=workers,
    )


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)
