"""moeserve end to end on the real node: `helm install` the chart with the image built from the
repository's Dockerfile (the operator runs in-cluster as the chart's Deployment, with its
ServiceAccount), `kubectl apply` a MoEService for a tiny random model on a hostPath-backed
PersistentVolumeClaim (1 attention + 2 expert ranks, CPU), and check what a user sees, step by step.

The tests run in file order against one MoEService (module fixture `service`); each step waits on
a condition with a stated timeout, never on a sleep. Reference outputs come from `moeserve generate`
on the same checkpoint, in this process's environment. Timings are printed (`-s` shows them).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes import client

from moeserve import contract
from moeserve.v1 import inference_pb2, inference_pb2_grpc
from tests.controlplane import ControlPlane
from tests.controlplane.node import NODE_NAME
from tests.controlplane.waiting import wait_until
from tests.e2e.conftest import new_namespace
from tests.e2e.support import Kubectl
from tests.moeservices import CHART

# Generous: the first test also waits for the session's cluster (an image import) and the service.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3000)]

NAME = "tiny"
MODEL_PATH = "/models/tiny"
PROMPTS = ([1, 2, 3], [7, 8])
MAX_TOKENS = 16

HELM_TIMEOUT_S = 300
"""helm install --wait: the operator pod (image already on the node) Running and Ready."""
SERVING_TIMEOUT_S = 900.0
"""MoEService applied -> Ready=True: four Ray pods start, join, the Serve app deploys and its model
instance loads on CPU, all on a busy 2-core machine."""
RESTART_BOUND_S = 900.0
"""Expert pod deleted -> the group recreated, Ready=True again and the reference outputs served."""
DELETE_TIMEOUT_S = 300.0

# Memory limits so that 4 Ray pods (7 while scaled to 2) and the operator fit a 24 GiB machine. The
# head hosts every Serve actor: 3.1 GB in use at 2 replicas, so a 3Gi limit let Ray's memory monitor
# (95% of the limit) kill the Serve controller in a loop (README: head memory).
HEAD_RESOURCES = {"requests": {"cpu": "100m", "memory": "1Gi"}, "limits": {"memory": "5Gi"}}
WORKER_RESOURCES = {"requests": {"cpu": "100m", "memory": "768Mi"}, "limits": {"memory": "2Gi"}}


def _log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Service:
    namespace: str
    release: str
    model_dir: Path
    reference: list[list[int]]
    token: str
    # The client's models type every field Optional; these tests read what the API server filled in.
    core: Any
    custom: Any

    def moe(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, self.namespace, "moeservices", NAME
        )
        return obj

    def condition(self, kind: str) -> dict[str, Any] | None:
        for c in self.moe().get("status", {}).get("conditions") or []:
            if c.get("type") == kind:
                return dict(c)
        return None

    def ray_pods(self) -> list[Any]:
        pods = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{contract.LABEL_SERVICE}={NAME}"
        )
        return list(pods.items)

    def cluster_ip(self, service: str) -> str:
        return str(self.core.read_namespaced_service(service, self.namespace).spec.cluster_ip)

    def dashboard(self, path: str) -> Any:
        """GET a Ray dashboard path through the head Service's ClusterIP, with the Ray auth token."""
        url = f"http://{self.cluster_ip(f'{NAME}-head')}:{contract.RAY_DASHBOARD_PORT}{path}"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read().decode())

    def grpc_address(self) -> str:
        return f"{self.cluster_ip(NAME)}:{self.grpc_port()}"

    def grpc_port(self) -> int:
        return int(self.moe()["spec"].get("serving", {}).get("grpcPort", 9000))


def _moeserve_command() -> str:
    """The `moeserve` console script of this Python environment (what a user runs)."""
    beside = Path(sys.executable).parent / "moeserve"
    found = str(beside) if beside.is_file() else shutil.which("moeserve")
    if found is None:
        install = 'pip install -e ".[dev,operator,ray]"'
        pytest.fail(f"the `moeserve` command is not installed: {install}", pytrace=False)
    return found


def _moeserve(*args: str, timeout_s: float = 600.0) -> str:
    done = subprocess.run([_moeserve_command(), *args], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise AssertionError(f"moeserve {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def _token_ids(json_lines: str) -> list[list[int]]:
    return [list(json.loads(line)["token_ids"]) for line in json_lines.splitlines() if line.strip()]


def _prompt_args() -> list[str]:
    args = []
    for prompt in PROMPTS:
        args += ["--prompt-ids", ",".join(map(str, prompt))]
    return args


def generate_through(address: str) -> list[list[int]]:
    """Greedy tokens of PROMPTS from a server, with `moeserve generate --endpoint` (what a user runs)."""
    out = _moeserve(
        "generate", "--endpoint", address, *_prompt_args(), "--max-tokens", str(MAX_TOKENS), "--json"
    )
    return _token_ids(out)


def health(address: str, service: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=30
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def _manifests(namespace: str, model_dir: Path, image: str) -> list[dict[str, Any]]:
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-model"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": str(model_dir), "type": "Directory"},
            "claimRef": {"namespace": namespace, "name": "model"},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "model", "namespace": namespace},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "volumeName": f"{namespace}-model",
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    moe = {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
        "kind": "MoEService",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "image": image,
            "imagePullPolicy": "Never",
            "replicas": 1,
            "model": {
                "path": MODEL_PATH,
                "dtype": "float32",
                "volume": {"persistentVolumeClaim": {"claimName": "model"}},
            },
            "attention": {"ranks": 1, "gpusPerRank": 0, "resources": WORKER_RESOURCES},
            "experts": {"ranks": 2, "gpusPerRank": 0, "resources": WORKER_RESOURCES},
            "head": {"resources": HEAD_RESOURCES},
            "serving": {"engine": {"kvCacheTokens": 8192, "maxRunningRequests": 8}},
        },
    }
    return [pv, pvc, moe]


def _helm(plane: ControlPlane, *args: str, timeout_s: float = HELM_TIMEOUT_S + 60) -> str:
    assert plane.bin_dir
    command = [str(plane.bin_dir / "helm"), f"--kubeconfig={plane.kubeconfig}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stderr}{done.stdout}")
    return done.stdout


@pytest.fixture(scope="module")
def service(
    e2e_cluster: ControlPlane, e2e_client: client.ApiClient, kubectl: Kubectl, images: dict[str, str]
) -> Iterator[Service]:
    core: Any = client.CoreV1Api(e2e_client)
    namespace = new_namespace(core, "moe")
    model_dir = Path(tempfile.mkdtemp(prefix="moeserve-e2e-model-"))
    model_dir.chmod(0o755)
    _moeserve("model", "init-random", "--preset", "tiny", "--out", str(model_dir))
    for file in model_dir.iterdir():  # the pods run as uid 1000; init-random writes files 0600
        file.chmod(0o644)
    reference = _token_ids(
        _moeserve(
            "generate",
            "--model",
            str(model_dir),
            *_prompt_args(),
            "--max-tokens",
            str(MAX_TOKENS),
            "--json",
            "--dtype",
            "float32",  # what the pods compute in (spec.model.dtype)
        )
    )
    assert len(reference) == len(PROMPTS) and all(len(t) == MAX_TOKENS for t in reference)

    repository, tag = images["moeserve"].rsplit(":", 1)
    started = time.monotonic()
    _helm(
        e2e_cluster,
        "install", "moeserve", str(CHART), f"--namespace={namespace}",
        f"--set=image.repository={repository}", f"--set=image.tag={tag}", "--set=image.pullPolicy=Never",
        "--set=operator.reconcileIntervalSeconds=10", "--set=operator.dashboardRetryMaxSeconds=10",
        "--wait", f"--timeout={HELM_TIMEOUT_S}s",
    )  # fmt: skip
    _log(f"helm install --wait: operator Ready in {time.monotonic() - started:.0f}s")

    documents = _manifests(namespace, model_dir, images["moeserve"])
    manifest = Path(tempfile.mkdtemp()) / "moeservice.yaml"
    manifest.write_text(yaml.safe_dump_all(documents))
    kubectl("apply", "-f", str(manifest))
    applied = time.monotonic()

    secret = wait_until(
        "the Ray auth Secret",
        lambda: core.read_namespaced_secret(f"{NAME}-ray-auth", namespace),
        120.0,
        ignore=(client.ApiException,),
    )
    token = base64.b64decode(secret.data[contract.RAY_AUTH_SECRET_KEY]).decode()
    svc = Service(
        namespace, "moeserve", model_dir, reference, token, core, client.CustomObjectsApi(e2e_client)
    )
    svc.applied_at = applied  # type: ignore[attr-defined]
    try:
        yield svc
    finally:
        kubectl("delete", "moe", NAME, "-n", namespace, "--ignore-not-found", "--wait=false", check=False)
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        kubectl("delete", "pv", f"{namespace}-model", "--wait=false", check=False)


def _pod_ready(pod: Any) -> bool:
    conditions = pod.status.conditions or []
    return pod.status.phase == "Running" and any(c.type == "Ready" and c.status == "True" for c in conditions)


def _role_pods(svc: Service, role: str) -> list[Any]:
    return [p for p in svc.ray_pods() if p.metadata.labels.get(contract.LABEL_ROLE) == role]


def _wait_serving(svc: Service, replicas: int, timeout_s: float, what: str) -> None:
    """Ready=True, readyReplicas == replicas, every Ray pod Running and Ready."""

    def serving() -> bool:
        ready = svc.condition("Ready")
        status = svc.moe().get("status", {})
        pods = svc.ray_pods()
        want = 1 + replicas * 3
        return (
            ready is not None
            and ready.get("status") == "True"
            and status.get("readyReplicas") == replicas
            and len(pods) == want
            and all(_pod_ready(p) for p in pods)
        )

    def describe() -> str:
        pods = ", ".join(f"{p.metadata.name}={p.status.phase}" for p in svc.ray_pods())
        return f"{what}; status {svc.moe().get('status')}; pods {pods}"

    try:
        wait_until(what, serving, timeout_s, interval_s=2.0, ignore=(client.ApiException, OSError))
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{describe()}") from None


def test_serving_after_apply(service: Service) -> None:
    _wait_serving(service, 1, SERVING_TIMEOUT_S, "MoEService Ready=True with 1 instance")
    _log(f"kubectl apply -> Ready=True in {time.monotonic() - service.applied_at:.0f}s")  # type: ignore[attr-defined]
    pods = service.ray_pods()
    roles = sorted(p.metadata.labels[contract.LABEL_ROLE] for p in pods)
    assert roles == sorted(
        [contract.ROLE_HEAD, contract.ROLE_ATTENTION, contract.ROLE_EXPERT, contract.ROLE_EXPERT]
    )
    assert all(p.spec.node_name == NODE_NAME for p in pods)
    status = service.moe()["status"]
    assert status["readyReplicas"] == 1
    assert status["endpoint"] == f"{NAME}.{service.namespace}.svc:{service.grpc_port()}"


def test_ray_cluster_joined(service: Service) -> None:
    """Head + 3 workers alive, as the Ray dashboard (through the head Service) reports them."""
    answer = service.dashboard("/api/v0/nodes?limit=100")
    nodes = answer["data"]["result"]["result"]
    alive = [n for n in nodes if n.get("state") == "ALIVE"]
    assert len(alive) == 4, nodes
    assert sum(1 for n in alive if n.get("is_head_node")) == 1
    pod_ips = {p.status.pod_ip for p in service.ray_pods()}
    assert {n["node_ip"] for n in alive} == pod_ips


def test_serve_app_running(service: Service) -> None:
    apps = service.dashboard("/api/serve/applications/")["applications"]
    assert apps[contract.SERVE_APP_NAME]["status"] == "RUNNING", apps
    ready = service.condition("Ready")
    assert ready is not None and ready["status"] == "True"


def test_tokens_through_cluster_ip(service: Service) -> None:
    address = service.grpc_address()
    assert health(address) == "SERVING"
    assert generate_through(address) == service.reference


@contextlib.contextmanager
def port_forward(service: Service, e2e_cluster: ControlPlane, port: int) -> Iterator[int]:
    """`kubectl port-forward service/NAME 0:port`, as the README says; yields the local port."""
    forward = subprocess.Popen(
        [
            "kubectl", f"--kubeconfig={e2e_cluster.kubeconfig}", "port-forward", "-n", service.namespace,
            f"service/{NAME}", f"0:{port}",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 9000"
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"kubectl port-forward said {line!r}"
        yield int(match.group(1))
    finally:
        forward.terminate()
        forward.wait(timeout=30)


def test_tokens_through_port_forward(service: Service, e2e_cluster: ControlPlane) -> None:
    with port_forward(service, e2e_cluster, service.grpc_port()) as local:
        address = f"127.0.0.1:{local}"
        assert health(address) == "SERVING"
        assert generate_through(address) == service.reference


def test_openai_api_through_port_forward(service: Service, e2e_cluster: ControlPlane) -> None:
    """The client Service's `http` port: Ray Serve's HTTP proxy with the OpenAI API, the same greedy
    tokens (the tiny model has no tokenizer: logprobs name each token as `token_id:N`)."""
    import openai

    http_port = int(service.moe()["spec"].get("serving", {}).get("httpPort", 8000))
    with port_forward(service, e2e_cluster, http_port) as local:
        base = f"http://127.0.0.1:{local}"
        with urllib.request.urlopen(base + "/health", timeout=60) as reply:
            assert reply.status == 200 and json.loads(reply.read())["status"] == "serving"
        with openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300) as api:
            (model,) = [m.id for m in api.models.list().data]
            for prompt, want in zip(PROMPTS, service.reference, strict=True):
                done = api.completions.create(
                    model=model, prompt=list(prompt), max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0
                )
                (choice,) = done.choices
                assert choice.logprobs is not None and choice.logprobs.tokens is not None
                assert [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens] == want
                assert done.usage is not None and done.usage.completion_tokens == MAX_TOKENS


def _long_stream(
    address: str, max_model_len: int, first_token: threading.Event, result: dict[str, Any]
) -> None:
    """One greedy stream as long as the model allows; records how it ended."""
    request = inference_pb2.GenerateRequest(
        prompt_token_ids=[1, 2, 3],
        sampling=inference_pb2.SamplingParams(max_tokens=max_model_len - 3, temperature=0.0, ignore_eos=True),
    )
    tokens = 0
    try:
        with grpc.insecure_channel(address) as channel:
            for message in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=600):
                tokens += len(message.token_ids)
                first_token.set()
        result["code"] = grpc.StatusCode.OK
    except grpc.RpcError as err:
        result["code"] = err.code()
        result["details"] = err.details()
    finally:
        result["tokens"] = tokens
        first_token.set()


def test_expert_pod_killed_restarts_group(service: Service, kubectl: Kubectl) -> None:
    address = service.grpc_address()
    with grpc.insecure_channel(address) as channel:
        info = inference_pb2_grpc.InferenceStub(channel).GetModelInfo(
            inference_pb2.GetModelInfoRequest(), timeout=60
        )
    before = {p.metadata.name: p.metadata.uid for p in _role_pods(service, contract.ROLE_EXPERT)}
    assert len(before) == 2
    first_token, result = threading.Event(), {}  # type: ignore[var-annotated]
    stream = threading.Thread(target=_long_stream, args=(address, info.max_model_len, first_token, result))
    stream.start()
    assert first_token.wait(120), "the long stream produced no token within 120 s"
    assert "code" not in result, f"the stream ended before the pod was deleted: {result}"
    victim = sorted(before)[0]
    killed = time.monotonic()
    kubectl("delete", "pod", "-n", service.namespace, victim, "--wait=false")
    stream.join(timeout=600)
    assert not stream.is_alive()
    assert result["code"] == grpc.StatusCode.UNAVAILABLE, result
    _log(
        f"in-flight stream ended UNAVAILABLE after {result['tokens']} tokens, "
        f"{time.monotonic() - killed:.0f}s after the delete"
    )

    def group_replaced() -> bool:
        now = {p.metadata.name: p.metadata.uid for p in _role_pods(service, contract.ROLE_EXPERT)}
        return set(now) == set(before) and all(now[n] != before[n] for n in before)

    wait_until("both expert pods recreated (the group restarts as a unit)", group_replaced, RESTART_BOUND_S)
    remaining = RESTART_BOUND_S - (time.monotonic() - killed)
    _wait_serving(service, 1, max(remaining, 1.0), "Ready=True again after the expert pod was deleted")

    def same_outputs() -> bool:
        return generate_through(address) == service.reference

    wait_until(
        "the reference outputs again", same_outputs, max(RESTART_BOUND_S - (time.monotonic() - killed), 1.0),
        interval_s=2.0, ignore=(AssertionError, grpc.RpcError),
    )  # fmt: skip
    elapsed = time.monotonic() - killed
    _log(f"expert pod deleted -> group restarted, Ready=True, reference outputs in {elapsed:.0f}s")
    assert elapsed < RESTART_BOUND_S


def _operator_pod(svc: Service) -> Any:
    pods = svc.core.list_namespaced_pod(
        svc.namespace, label_selector="app.kubernetes.io/name=moeserve-operator"
    ).items
    running = [p for p in pods if p.metadata.deletion_timestamp is None]
    return running[0] if running else None


def _names(svc: Service) -> dict[str, set[str]]:
    ns = svc.namespace
    selector = f"{contract.LABEL_SERVICE}={NAME}"
    return {
        "pods": {p.metadata.name for p in svc.core.list_namespaced_pod(ns, label_selector=selector).items},
        "services": {
            s.metadata.name for s in svc.core.list_namespaced_service(ns, label_selector=selector).items
        },
        "configmaps": {
            c.metadata.name for c in svc.core.list_namespaced_config_map(ns, label_selector=selector).items
        },
    }


def _expected_names(replicas: int) -> dict[str, set[str]]:
    pods = {f"{NAME}-head"}
    pods |= {f"{NAME}-attention-{i}" for i in range(replicas)}
    pods |= {f"{NAME}-expert-{i}" for i in range(2 * replicas)}
    return {"pods": pods, "services": {NAME, f"{NAME}-head"}, "configmaps": {f"{NAME}-serve-config"}}


def test_scale_with_operator_restart(service: Service, kubectl: Kubectl) -> None:
    """Scale to 2 and delete the operator pod mid-reconcile: the new operator converges (two
    instances serving, no duplicate objects); then back to 1."""
    old_operator = _operator_pod(service)
    assert old_operator is not None
    started = time.monotonic()
    kubectl("scale", f"moe/{NAME}", "-n", service.namespace, "--replicas=2")
    wait_until(
        "the operator creating the second instance's pods",
        lambda: len(service.ray_pods()) > 4,
        300.0,
        ignore=(client.ApiException,),
    )
    kubectl("delete", "pod", "-n", service.namespace, old_operator.metadata.name, "--wait=false")
    wait_until(
        "a new operator pod Ready",
        lambda: (p := _operator_pod(service)) is not None
        and p.metadata.uid != old_operator.metadata.uid
        and _pod_ready(p),
        300.0,
        ignore=(client.ApiException,),
    )  # fmt: skip
    _wait_serving(service, 2, SERVING_TIMEOUT_S, "Ready=True with 2 instances after the operator restart")
    _log(f"scaled to 2 (operator deleted mid-reconcile) in {time.monotonic() - started:.0f}s")
    assert _names(service) == _expected_names(2)
    deployments = service.dashboard("/api/serve/applications/")["applications"][contract.SERVE_APP_NAME][
        "deployments"
    ]
    instances = [d for name, d in deployments.items() if "ModelInstance" in name]
    assert len(instances) == 1
    running = [r for r in instances[0]["replicas"] if r.get("state") == "RUNNING"]
    assert len(running) == 2, instances
    assert generate_through(service.grpc_address()) == service.reference

    started = time.monotonic()
    kubectl("scale", f"moe/{NAME}", "-n", service.namespace, "--replicas=1")
    _wait_serving(service, 1, SERVING_TIMEOUT_S, "Ready=True with 1 instance after scaling back")
    wait_until("the second instance's pods gone", lambda: _names(service) == _expected_names(1), 300.0)
    _log(f"scaled back to 1 in {time.monotonic() - started:.0f}s")
    assert generate_through(service.grpc_address()) == service.reference


def test_delete_removes_everything(service: Service, kubectl: Kubectl) -> None:
    kubectl("delete", "moe", NAME, "-n", service.namespace, "--wait=false")
    empty: dict[str, set[str]] = {"pods": set(), "services": set(), "configmaps": set()}
    wait_until(
        "every pod, Service and ConfigMap of the MoEService gone",
        lambda: _names(service) == empty,
        DELETE_TIMEOUT_S,
    )
    secrets = service.core.list_namespaced_secret(
        service.namespace, label_selector=f"{contract.LABEL_SERVICE}={NAME}"
    )
    assert secrets.items == []
