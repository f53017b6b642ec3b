"""The operator's builders and spec reading, without a cluster: what a MoEService becomes.

Also holds the chart's CRD and example to the code: the CRD's defaults are the spec reader's and
ServeAppConfig's, and the example maps onto a ServeAppConfig and a deploy document Ray accepts.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from moeserve import contract
from moeserve.engine_settings import EngineSettings
from moeserve.operator import builders
from moeserve.operator.builders import GPU_RESOURCE, Owner
from moeserve.operator.spec import (
    ENGINE_FIELDS,
    PREFIX_CACHING_FIELD,
    SPECULATIVE_FIELDS,
    MoEServiceSpec,
    SpecError,
    serve_app_config,
)
from moeserve.serve_config import ServeAppConfig, ServeConfigError
from tests.moeservices import REPO, crd, example, merge, moeservice

pytestmark = pytest.mark.unit

OWNER = Owner(name="demo", namespace="models", uid="0000-uid")


def spec_of(**overrides: Any) -> MoEServiceSpec:
    return MoEServiceSpec.from_dict(moeservice(**overrides)["spec"])


def everything(spec: MoEServiceSpec) -> list[dict[str, Any]]:
    desired = builders.desired_state(OWNER, spec)
    workers = [
        builders.worker_pod(g, OWNER.name, i, "head-uid") for g in desired.workers for i in range(g.size)
    ]
    return [desired.config_map, *desired.services, desired.head, *workers]


def container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


# -- the Serve application -------------------------------------------------------------------------


def test_chart_example_maps_onto_a_valid_serve_app_config() -> None:
    spec = MoEServiceSpec.from_dict(example()["spec"])
    cfg = serve_app_config(spec)
    assert ServeAppConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.attention_ranks, cfg.expert_ranks, cfg.replicas) == (2, 2, 1)
    assert cfg.placement is not None and [len(rank) for rank in cfg.placement] == [32, 32]
    assert cfg.gpus_per_attention_rank == 1.0 and cfg.gpus_per_expert_rank == 1.0
    assert cfg.engine.max_model_len == 8192 and cfg.engine.kv_cache_tokens == 131072


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic deprecations inside ray
def test_deploy_document_is_accepted_by_ray_serve_and_carries_the_app_config() -> None:
    from ray.serve.schema import ServeDeploySchema  # the schema Ray's PUT handler validates with

    spec = spec_of(serving={"grpcPort": 9100, "httpPort": 8100})
    document = builders.serve_deploy_document(spec)
    parsed = ServeDeploySchema.model_validate(document)
    assert parsed.grpc_options.port == 9100
    assert (parsed.http_options.host, parsed.http_options.port) == ("0.0.0.0", 8100)  # OpenAI API
    assert parsed.grpc_options.grpc_servicer_functions == [
        "moeserve.v1.inference_pb2_grpc.add_InferenceServicer_to_server",
        "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    ]
    (app,) = parsed.applications
    assert app.route_prefix == "/" and app.import_path == "moeserve.workers.ray_app.app:build_app"
    assert ServeAppConfig.from_dict(app.args) == serve_app_config(spec)


def test_config_map_holds_the_app_config_and_the_deploy_document() -> None:
    spec = spec_of()
    data = builders.config_map(OWNER, spec)["data"]
    assert ServeAppConfig.from_dict(json.loads(data[contract.SERVE_CONFIG_KEY])) == serve_app_config(spec)
    assert json.loads(data[contract.SERVE_DEPLOY_KEY]) == builders.serve_deploy_document(spec)


def test_scaled_to_zero_deploys_no_application_but_still_validates_the_spec() -> None:
    spec = spec_of(replicas=0)
    assert builders.serve_deploy_document(spec)["applications"] == []
    assert contract.SERVE_CONFIG_KEY not in builders.config_map(OWNER, spec)["data"]
    assert [g.size for g in builders.desired_state(OWNER, spec).workers] == [0, 0]
    with pytest.raises(ServeConfigError, match="placement"):
        builders.desired_state(OWNER, spec_of(replicas=0, experts={"placement": [[0], [0]]}))


def test_placement_hosting_an_expert_twice_fails_validation_naming_the_field() -> None:
    spec = spec_of(experts={"placement": [[0, 1], [1, 2]]})
    with pytest.raises(ServeConfigError, match=r"^placement: experts \[1\] are hosted more than once"):
        builders.desired_state(OWNER, spec)


# -- pods and services ----------------------------------------------------------------------------


def test_every_object_is_labelled_and_owned_by_the_moeservice() -> None:
    objects = everything(spec_of())
    assert len(objects) == 1 + 2 + 1 + 4
    for obj in objects:
        meta = obj["metadata"]
        assert meta["namespace"] == "models"
        assert meta["labels"][contract.LABEL_SERVICE] == "demo"
        (ref,) = meta["ownerReferences"]
        assert ref == {
            "apiVersion": "moeserve.io/v1alpha1",
            "kind": "MoEService",
            "name": "demo",
            "uid": "0000-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    roles = {
        o["metadata"]["name"]: o["metadata"]["labels"].get(contract.LABEL_ROLE)
        for o in objects
        if o["kind"] == "Pod"
    }
    assert roles == {
        "demo-head": "head",
        "demo-attention-0": "attention",
        "demo-attention-1": "attention",
        "demo-expert-0": "expert",
        "demo-expert-1": "expert",
    }


def test_worker_pods_request_their_gpus_and_offer_one_unit_of_their_ray_resource() -> None:
    spec = spec_of(
        attention={"gpusPerRank": 2, "resources": {"requests": {"cpu": "4"}}}, experts={"gpusPerRank": 1}
    )
    desired = builders.desired_state(OWNER, spec)
    for group, gpus, resource in zip(
        desired.workers, (2, 1), ("moeserve_attention", "moeserve_expert"), strict=True
    ):
        pod = builders.worker_pod(group, OWNER.name, 1, "head-uid")
        c = container(pod)
        assert c["resources"]["limits"][GPU_RESOURCE] == str(gpus)
        assert c["resources"]["requests"][GPU_RESOURCE] == str(gpus)
        assert f"--num-gpus={gpus}" in c["command"]
        assert f'--resources={{"{resource}": 1}}' in c["command"]
        assert "--address=demo-head.models.svc:6379" in c["command"]
        assert "--metrics-export-port=8080" in c["command"]
        assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
        assert pod["spec"]["restartPolicy"] == "Never"
        meta = pod["metadata"]
        assert meta["name"] == f"demo-{group.role}-1" and meta["labels"][contract.LABEL_INDEX] == "1"
        assert meta["annotations"][contract.ANNOTATION_HEAD_UID] == "head-uid"
        assert contract.ANNOTATION_GROUP_SIZE not in meta["annotations"]  # set once the group is complete
    assert container(desired.workers[0].template)["resources"]["requests"]["cpu"] == "4"
    head = container(desired.head)
    assert GPU_RESOURCE not in json.dumps(head["resources"]) and "--num-gpus=0" in head["command"]
    assert "--metrics-export-port=8080" in head["command"]
    assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in head["ports"]


def test_cpu_only_ranks_request_no_gpus() -> None:
    spec = spec_of(attention={"gpusPerRank": 0}, experts={"gpusPerRank": 0})
    for group in builders.desired_state(OWNER, spec).workers:
        assert GPU_RESOURCE not in json.dumps(group.template)
        assert "--num-gpus=0" in container(group.template)["command"]


def test_group_sizes_are_replicas_times_ranks() -> None:
    spec = spec_of(replicas=3, attention={"ranks": 2}, experts={"ranks": 4})
    assert {g.role: g.size for g in builders.desired_state(OWNER, spec).workers} == {
        "attention": 6,
        "expert": 12,
    }


def worker_pods(spec: MoEServiceSpec) -> dict[str, dict[str, Any]]:
    return {
        p["metadata"]["name"]: p
        for p in everything(spec)
        if p["kind"] == "Pod" and "head" not in p["metadata"]["name"]
    }


def test_worker_pods_are_labelled_with_their_model_instance_across_both_roles() -> None:
    pods = worker_pods(spec_of(replicas=2, attention={"ranks": 2}, experts={"ranks": 3}))
    instances = {name: pod["metadata"]["labels"][contract.LABEL_INSTANCE] for name, pod in pods.items()}
    assert instances == {
        "demo-attention-0": "0",
        "demo-attention-1": "0",
        "demo-attention-2": "1",
        "demo-attention-3": "1",
        "demo-expert-0": "0",
        "demo-expert-1": "0",
        "demo-expert-2": "0",
        "demo-expert-3": "1",
        "demo-expert-4": "1",
        "demo-expert-5": "1",
    }
    for name, pod in pods.items():  # the Ray node says it too (ray status, placement-group selectors)
        assert container(pod)["command"][-1] == f"--labels=moeserve.io/instance={instances[name]}"


def test_instance_ranks_pack_onto_a_node_then_a_domain_and_instances_spread() -> None:
    spec = spec_of(scheduling={"topologyKey": "topology.kubernetes.io/zone"})
    desired = builders.desired_state(OWNER, spec)
    service_only = {"matchLabels": {contract.LABEL_SERVICE: "demo"}}
    for group in desired.workers:
        affinity = group.template["spec"]["affinity"]
        assert affinity["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == [
            {
                "weight": 100,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": service_only,
                    "matchLabelKeys": ["moeserve.io/instance"],
                },
            },
            {
                "weight": 50,
                "podAffinityTerm": {
                    "topologyKey": "topology.kubernetes.io/zone",
                    "labelSelector": service_only,
                    "matchLabelKeys": ["moeserve.io/instance"],
                },
            },
        ]
        assert "requiredDuringSchedulingIgnoredDuringExecution" not in affinity["podAffinity"]
        (spread,) = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert spread == {
            "weight": 20,
            "podAffinityTerm": {
                "topologyKey": "topology.kubernetes.io/zone",
                "labelSelector": {
                    "matchLabels": {contract.LABEL_SERVICE: "demo"},
                    "matchExpressions": [{"key": "moeserve.io/instance", "operator": "Exists"}],
                },
                "mismatchLabelKeys": ["moeserve.io/instance"],
            },
        }
        assert spread["weight"] < 50, "spreading instances must never outweigh packing one"
        assert "topologySpreadConstraints" not in group.template["spec"]
    assert "affinity" not in desired.head["spec"]


def test_hostname_topology_packs_on_the_node_only_and_required_packing_is_hard() -> None:
    spec = spec_of(scheduling={"packing": "Required"})
    affinity = builders.desired_state(OWNER, spec).workers[0].template["spec"]["affinity"]
    (node,) = affinity["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert node["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    (required,) = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["topologyKey"] == "kubernetes.io/hostname"
    assert required["matchLabelKeys"] == ["moeserve.io/instance"]
    (spread,) = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_instance_terms_are_added_to_the_users_affinity() -> None:
    node_affinity: dict[str, Any] = {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
    }
    mine = {"weight": 1, "podAffinityTerm": {"topologyKey": "moeserve.io/rack", "labelSelector": {}}}
    spec = spec_of(
        scheduling={
            "topologyKey": "moeserve.io/rack",
            "affinity": {
                "nodeAffinity": node_affinity,
                "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [mine]},
            },
        }
    )
    template = builders.desired_state(OWNER, spec).workers[1].template
    affinity = template["spec"]["affinity"]
    assert affinity["nodeAffinity"] == node_affinity
    preferred = affinity["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0] == mine and [t["weight"] for t in preferred[1:]] == [100, 50]
    assert builders.desired_state(OWNER, spec).head["spec"]["affinity"] == {
        "nodeAffinity": node_affinity,
        "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [mine]},
    }


def test_node_selector_tolerations_and_priority_go_to_every_pod() -> None:
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    spec = spec_of(
        scheduling={
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [toleration],
            "priorityClassName": "inference",
        }
    )
    pods = [o for o in everything(spec) if o["kind"] == "Pod"]
    for pod in pods:
        assert pod["spec"]["nodeSelector"] == {"pool": "gpu"}
        assert pod["spec"]["tolerations"] == [toleration]
        assert pod["spec"]["priorityClassName"] == "inference"


def test_scaling_keeps_the_pod_templates_and_a_spec_change_does_not() -> None:
    def hashes(spec: MoEServiceSpec) -> list[str]:
        desired = builders.desired_state(OWNER, spec)
        return [
            builders.template_hash(desired.head),
            *(builders.template_hash(g.template) for g in desired.workers),
        ]

    base = hashes(spec_of())
    assert hashes(spec_of(replicas=5)) == base
    assert hashes(spec_of(serving={"engine": {"maxRunningRequests": 8}})) == base  # lives in the ConfigMap
    image = hashes(spec_of(image="registry.invalid/moeserve:other"))
    assert all(a != b for a, b in zip(image, base, strict=True))
    gpus = hashes(spec_of(experts={"gpusPerRank": 2}))
    assert gpus[:2] == base[:2] and gpus[2] != base[2]


def test_services_expose_the_head_and_the_grpc_endpoint() -> None:
    spec = spec_of(serving={"grpcPort": 9100, "httpPort": 8100})
    head, client = builders.desired_state(OWNER, spec).services
    head_selector = builders.labels("demo", "head")
    assert head_selector[contract.LABEL_ROLE] == "head" and head_selector[contract.LABEL_SERVICE] == "demo"
    assert head["metadata"]["name"] == "demo-head" and client["metadata"]["name"] == "demo"
    assert head["spec"]["selector"] == head_selector
    # clients reach only a head whose Serve application the operator saw RUNNING
    assert client["spec"]["selector"] == {**head_selector, "moeserve.io/serve": "true"}
    assert {p["name"]: p["port"] for p in head["spec"]["ports"]} == {
        "gcs": 6379,
        "dashboard": 8265,
        "grpc": 9100,
        "http": 8100,
    }
    assert [(p["name"], p["port"], p["targetPort"]) for p in client["spec"]["ports"]] == [
        ("grpc", 9100, "grpc"),
        ("http", 8100, "http"),
    ]
    ports = {p["name"]: p["containerPort"] for p in container(builders.head_pod(OWNER, spec))["ports"]}
    want = {"gcs": 6379, "dashboard": 8265, "grpc": 9100, "http": 8100, "agent": 52365, "metrics": 8080}
    assert ports == want
    assert serve_app_config(spec).ports.http == 8100
    assert builders.endpoint(OWNER, spec) == "demo.models.svc:9100"


# -- the model volume, init containers, probes -----------------------------------------------------


def pods_of(spec: MoEServiceSpec) -> list[dict[str, Any]]:
    return [o for o in everything(spec) if o["kind"] == "Pod"]


@pytest.mark.parametrize(
    "source, attached",
    [
        ({"persistentVolumeClaim": {"claimName": "models"}}, {"claimName": "models", "readOnly": True}),
        ({"hostPath": {"path": "/data/tiny"}}, {"path": "/data/tiny"}),
        ({"image": {"reference": "registry.invalid/tiny:1"}}, {"reference": "registry.invalid/tiny:1"}),
        ({"nfs": {"server": "nfs", "path": "/m"}}, {"server": "nfs", "path": "/m", "readOnly": True}),
        ({"csi": {"driver": "x.csi.io"}}, {"driver": "x.csi.io", "readOnly": True}),
    ],
)
def test_the_model_volume_is_mounted_read_only_at_the_model_path_in_every_ray_pod(
    source: dict[str, Any], attached: dict[str, Any]
) -> None:
    spec = spec_of(model={"path": "/models/tiny", "volume": source, "subPath": "tiny"})
    ((kind, _),) = source.items()
    pods = pods_of(spec)
    assert len(pods) == 5
    for pod in pods:
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "model"]
        assert volume == {"name": "model", kind: attached}
        mount = {"name": "model", "mountPath": "/models/tiny", "readOnly": True, "subPath": "tiny"}
        check = pod["spec"]["initContainers"][0]
        assert check["name"] == "model-check" and check["volumeMounts"] == [mount]
        assert mount in container(pod)["volumeMounts"]


def test_without_a_volume_the_pods_still_check_the_model_path_but_mount_nothing() -> None:
    for pod in pods_of(spec_of()):
        assert [v["name"] for v in pod["spec"]["volumes"] if v["name"] == "model"] == []
        check = pod["spec"]["initContainers"][0]
        assert check["env"] == [{"name": "MOESERVE_MODEL_PATH", "value": "/models/tiny"}]
        assert check["command"] == ["sh", "-c", builders.MODEL_CHECK_SCRIPT]
        assert check["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert all(m["name"] != "model" for m in container(pod)["volumeMounts"])


def run_model_check(path: Path, tmp_path: Path) -> tuple[int, str, str]:
    log = tmp_path / "termination-log"
    env = {"PATH": "/usr/bin:/bin", "MOESERVE_MODEL_PATH": str(path), "MOESERVE_TERMINATION_LOG": str(log)}
    done = subprocess.run(
        ["sh", "-c", builders.MODEL_CHECK_SCRIPT], env=env, capture_output=True, text=True, timeout=30
    )
    return done.returncode, done.stderr.strip(), log.read_text().strip() if log.exists() else ""


def test_model_check_fails_with_a_one_line_termination_message_naming_the_path(tmp_path: Path) -> None:
    model = tmp_path / "models" / "tiny dir"  # a space: the path is data, not script text
    code, stderr, message = run_model_check(model, tmp_path)
    assert code == 1
    assert (
        message
        == f"model unavailable at {model}: no such directory (is the model volume bound and populated?)"
    )
    assert stderr == message
    model.mkdir(parents=True)
    code, _, message = run_model_check(model, tmp_path)
    assert (code, message) == (
        1,
        f"model unavailable at {model}: no config.json readable by uid {os.getuid()}",
    )
    (model / "config.json").write_text("{}")
    code, _, message = run_model_check(model, tmp_path)
    assert code == 1 and message.endswith(
        "no model.safetensors or model.safetensors.index.json readable by uid " + str(os.getuid())
    )
    (model / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "termination-log").unlink()
    assert run_model_check(model, tmp_path) == (0, "", "")


def test_the_embedded_model_passes_the_model_check(tmp_path: Path) -> None:
    embedded = REPO / "workers" / "assets" / "default-model"
    assert run_model_check(embedded, tmp_path)[0] == 0


def test_probes_use_rays_unauthenticated_health_endpoints() -> None:
    spec = spec_of(probes={"startupSeconds": 900})
    desired = builders.desired_state(OWNER, spec)
    head = container(desired.head)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert head[kind]["httpGet"] == {"path": "/api/gcs_healthz", "port": "dashboard"}
    assert head["startupProbe"]["periodSeconds"] * head["startupProbe"]["failureThreshold"] == 900
    assert head["livenessProbe"]["periodSeconds"] * head["livenessProbe"]["failureThreshold"] == 60
    assert "--dashboard-agent-listen-port=52365" in head["command"]
    for c in (head, *(container(g.template) for g in desired.workers)):  # Ray registers the pod IP
        assert "--node-ip-address=$(MOESERVE_POD_IP)" in c["command"]
        assert c["env"][0] == {
            "name": "MOESERVE_POD_IP",
            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
        }
    for group in desired.workers:
        worker = container(group.template)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert worker[kind]["httpGet"] == {"path": "/api/local_raylet_healthz", "port": "agent"}
        assert worker["startupProbe"]["periodSeconds"] * worker["startupProbe"]["failureThreshold"] == 900
        assert {"name": "agent", "containerPort": 52365, "protocol": "TCP"} in worker["ports"]
        assert "--dashboard-agent-listen-port=52365" in worker["command"]


def test_ray_paths_are_public_in_the_installed_ray() -> None:
    """The probes carry no token: the endpoints they use must stay exempt from Ray's token auth."""
    import inspect

    from ray.dashboard import http_server_agent, http_server_head

    assert "/api/gcs_healthz" in inspect.getsource(http_server_head)
    assert "/api/local_raylet_healthz" in http_server_agent.PUBLIC_EXACT_PATHS


class _Healthz(BaseHTTPRequestHandler):
    answers: list[bytes] = []

    def do_GET(self) -> None:  # noqa: N802
        body = self.answers.pop(0) if self.answers else b"success"
        self.send_response(200 if body == b"success" else 503)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_workers_wait_for_the_heads_gcs_before_ray_start() -> None:
    template = builders.desired_state(OWNER, spec_of()).workers[0].template
    model_check, wait = template["spec"]["initContainers"]
    assert (model_check["name"], wait["name"]) == ("model-check", "wait-for-head")
    (env,) = wait["env"]
    assert env["value"] == "http://demo-head.models.svc:8265/api/gcs_healthz"
    _Healthz.answers = [b"not yet"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/gcs_healthz"
        env_vars = {**os.environ, "MOESERVE_HEAD_HEALTH_URL": url}
        command = [sys.executable if c == "python" else c for c in wait["command"]]
        done = subprocess.run(command, env=env_vars, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"waiting for the Ray head at {url}: HTTP Error 503: Service Unavailable",
        f"the Ray head answers at {url}",
    ]


def test_cpu_only_services_ask_for_no_gpu_and_run_gloo() -> None:
    spec = spec_of(attention={"gpusPerRank": 0}, experts={"gpusPerRank": 0})
    for pod in pods_of(spec):
        assert GPU_RESOURCE not in json.dumps(pod)
        assert "tolerations" not in pod["spec"] and "nodeSelector" not in pod["spec"]
    cfg = serve_app_config(spec)
    assert (cfg.gpus_per_attention_rank, cfg.gpus_per_expert_rank) == (0.0, 0.0)
    # how the Serve application (the module the deploy document names) picks backend and device
    app = importlib.import_module(contract.SERVE_APP_IMPORT_PATH.split(":")[0])
    rank_spec = app.rank_spec
    assert rank_spec(cfg).ep.backend == "gloo"
    gpu = serve_app_config(spec_of())
    assert rank_spec(gpu).ep.backend == "nccl"


def test_ray_pods_run_unprivileged_with_the_specs_pull_policy() -> None:
    for pod in pods_of(spec_of(imagePullPolicy="Never")):
        assert pod["spec"]["securityContext"] == {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert pod["spec"]["automountServiceAccountToken"] is False
        for c in [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]:
            assert c["imagePullPolicy"] == "Never" and c["image"] == "registry.invalid/moeserve:test"
            assert c["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            }
    assert all("imagePullPolicy" not in c for c in pods_of(spec_of())[0]["spec"]["containers"])


# -- reading the spec ------------------------------------------------------------------------------


IMAGE_MIN = "registry.invalid/x:1"


def test_a_minimal_spec_gets_the_defaults() -> None:
    spec = MoEServiceSpec.from_dict({"image": IMAGE_MIN, "model": {"path": "/m"}})
    cfg = serve_app_config(spec)
    assert (cfg.replicas, cfg.attention_ranks, cfg.expert_ranks, cfg.placement) == (1, 1, 1, None)
    assert (cfg.ports.grpc, cfg.ports.metrics, cfg.ports.http) == (9000, 8080, 8000)
    assert cfg.engine == EngineSettings()
    assert cfg.gpus_per_attention_rank == 1.0 and cfg.gpus_per_expert_rank == 1.0
    assert spec.scheduling.packing == "Preferred" and spec.scheduling.topology_key == "kubernetes.io/hostname"
    assert spec.model.volume is None and spec.probes.startup_s == 600 and spec.image_pull_policy == ""


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"model": {"path": "/m"}}, "spec.image: required"),
        ({"image": "x", "model": {}}, "spec.model.path: required"),
        ({"image": "x", "model": {"path": "/m"}, "replicas": "2"}, "spec.replicas: expected an integer"),
        ({"image": "x", "model": {"path": "/m"}, "attention": []}, "spec.attention: expected an object"),
        (
            {"image": "x", "model": {"path": "/m"}, "scheduling": {"packing": "Fill"}},
            "spec.scheduling.packing: must be one of",
        ),
        (
            {"image": "x", "model": {"path": "/m", "volume": {"hostPath": {"path": "/a"}, "nfs": {}}}},
            "spec.model.volume: must set exactly one of",
        ),
        (
            {"image": "x", "model": {"path": "/m", "volume": {"emptyDir": {}}}},
            "spec.model.volume: must set exactly one of persistentVolumeClaim, hostPath, image, nfs, csi",
        ),
        (
            {"image": "x", "model": {"path": "/m"}, "experts": {"placement": [[0, "a"]]}},
            "spec.experts.placement: expert ids",
        ),
    ],
)
def test_an_unreadable_spec_names_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=f"^{message}"):
        MoEServiceSpec.from_dict(spec)


# -- the chart's CRD -------------------------------------------------------------------------------


def _schema() -> dict[str, Any]:
    (version,) = crd()["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: defaults fill absent fields, recursively."""
    if schema.get("type") != "object" or not isinstance(value, dict):
        return value
    out = dict(value)
    for key, sub in (schema.get("properties") or {}).items():
        if key not in out and "default" in sub:
            out[key] = json.loads(json.dumps(sub["default"]))
        if key in out:
            out[key] = _apply_defaults(sub, out[key])
    return out


def test_crd_defaults_equal_the_spec_readers_and_serve_app_configs() -> None:
    minimal = {"image": IMAGE_MIN, "model": {"path": "/m"}}
    defaulted = _apply_defaults(_schema()["properties"]["spec"], minimal)
    assert defaulted["serving"]["engine"] == {
        **{crd_name: getattr(EngineSettings(), f) for crd_name, f in ENGINE_FIELDS.items()},
        PREFIX_CACHING_FIELD: EngineSettings().prefix_caching,
        "numSpeculativeTokens": EngineSettings().num_speculative_tokens,
    }
    assert MoEServiceSpec.from_dict(defaulted) == MoEServiceSpec.from_dict(minimal)
    from_crd = serve_app_config(MoEServiceSpec.from_dict(defaulted)).to_dict()
    plain = ServeAppConfig().to_dict()
    differs = {k for k in plain if from_crd[k] != plain[k]}
    # Only what a MoEService must say, or where a pod-based deployment needs another default.
    assert differs == {"model", "gpus_per_attention_rank", "gpus_per_expert_rank"}, differs


def test_crd_engine_fields_are_exactly_the_engine_limits() -> None:
    engine = _schema()["properties"]["spec"]["properties"]["serving"]["properties"]["engine"]
    assert set(engine["properties"]) == {*ENGINE_FIELDS, PREFIX_CACHING_FIELD, *SPECULATIVE_FIELDS}
    assert engine["properties"][PREFIX_CACHING_FIELD]["default"] is EngineSettings().prefix_caching
    assert engine["properties"]["speculative"]["enum"] == ["mtp"]
    # every EngineSettings field has a CRD home: max_model_len is spec.model.maxModelLen; the request
    # size limits keep their defaults on clusters (no CRD field yet)
    others = {"max_model_len", "limits", "prefix_caching", *SPECULATIVE_FIELDS.values()}
    assert sorted(ENGINE_FIELDS.values()) == sorted(set(EngineSettings().__dataclass_fields__) - others)


def test_mtp_speculation_travels_from_the_spec_to_the_serve_config() -> None:
    def config(engine: dict[str, Any]) -> ServeAppConfig:
        return serve_app_config(spec_of(serving={"engine": engine}))

    assert (config({}).engine.speculative, config({}).engine.num_speculative_tokens) == (None, 1)
    on = config({"speculative": "mtp", "numSpeculativeTokens": 3}).engine
    assert (on.speculative, on.num_speculative_tokens) == ("mtp", 3)
    with pytest.raises(SpecError, match=r"^spec.serving.engine.speculative: must be one of mtp, got 'eagle'"):
        config({"speculative": "eagle"})
    with pytest.raises(SpecError, match=r"^spec.serving.engine.numSpeculativeTokens: must be in \[1, 3\]"):
        config({"speculative": "mtp", "numSpeculativeTokens": 4})


def test_prefix_caching_travels_from_the_spec_to_the_serve_config() -> None:
    def config(engine: dict[str, Any]) -> ServeAppConfig:
        return serve_app_config(spec_of(serving={"engine": engine}))

    assert config({}).engine.prefix_caching is True
    assert config({PREFIX_CACHING_FIELD: False}).engine.prefix_caching is False
    with pytest.raises(SpecError, match=r"^spec.serving.engine.prefixCaching: expected a boolean, got 'no'"):
        config({PREFIX_CACHING_FIELD: "no"})


def test_crd_names_scale_subresource_and_printer_columns() -> None:
    definition = crd()
    names = definition["spec"]["names"]
    assert definition["metadata"]["name"] == f"{contract.PLURAL}.{contract.API_GROUP}"
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        contract.KIND,
        contract.PLURAL,
        [contract.SHORT_NAME],
    )
    (version,) = definition["spec"]["versions"]
    assert version["name"] == contract.API_VERSION
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns == ["Ready", "Replicas", "Attention", "Experts", "Endpoint", "Age"]


def test_test_builder_merges_nested_overrides() -> None:
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": None}) == {"a": {"b": 1, "c": 3}}


# -- layering --------------------------------------------------------------------------------------


def test_importing_the_operator_imports_neither_torch_nor_ray() -> None:
    code = (
        "import sys, moeserve.operator.main, moeserve.operator.handlers; "
        "bad = sorted(m for m in ('torch', 'ray') if m in sys.modules); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"moeserve.operator imported {done.stdout.strip()} {done.stderr[-2000:]}"


def test_events_name_the_moeservice_and_are_cut_to_the_api_limit() -> None:
    body = moeservice("demo", namespace="models")
    body["metadata"]["uid"] = "0000-uid"
    event = builders.event(body, "Warning", "ModelUnavailable", "x" * 5000, "2027-01-15T08:00:00Z")
    assert event["involvedObject"] == {
        "apiVersion": "moeserve.io/v1alpha1",
        "kind": "MoEService",
        "name": "demo",
        "namespace": "models",
        "uid": "0000-uid",
    }
    assert (event["type"], event["reason"], len(event["message"])) == ("Warning", "ModelUnavailable", 1024)
    assert event["metadata"] == {"generateName": "demo.", "namespace": "models"}


def test_serve_replicas_live_on_the_head_only() -> None:
    """A Serve replica on a worker pod would die with it when the group restarts (e2e finding)."""
    spec = spec_of()
    command = builders.head_pod(OWNER, spec)["spec"]["containers"][0]["command"]
    assert f'--resources={{"{builders.HEAD_RAY_RESOURCE}": 1}}' in command
    (app,) = builders.serve_deploy_document(spec)["applications"]
    pinned = {d["name"]: d["ray_actor_options"]["resources"] for d in app["deployments"]}
    assert pinned == {name: {builders.HEAD_RAY_RESOURCE: 0.001} for name in builders.SERVE_DEPLOYMENTS}
    for role in builders.WORKER_ROLES:
        worker = builders.worker_template(OWNER, spec, role)["spec"]["containers"][0]["command"]
        assert not any(builders.HEAD_RAY_RESOURCE in arg for arg in worker)
