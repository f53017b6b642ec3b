"""Reconcile passes against an in-memory API server and a fake Ray dashboard on localhost.

The fake API server keeps objects by kind and name, refuses duplicates like the real one and marks
pods Running on request; the fake dashboard (tests/fake_ray_dashboard.py) speaks the two calls of
Ray's Serve REST API and validates every PUT with ServeAppConfig, as the Serve app builder would.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from moeserve import contract
from moeserve.operator.kube import Rejected, Retryable, _classify
from moeserve.operator.ray_dashboard import ServeClient
from moeserve.operator.reconcile import Reconciler
from moeserve.operator.settings import OperatorSettings
from tests.fake_ray_dashboard import FakeDashboard
from tests.moeservices import moeservice

pytestmark = pytest.mark.unit

Manifest = dict[str, Any]


class FakeKube:
    """Just enough of an API server: names are unique per kind, uids are new per object."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Manifest]] = {
            "pods": {},
            "services": {},
            "configmaps": {},
            "secrets": {},
        }
        self.writes: list[tuple[str, str, str]] = []
        self.refuse: set[str] = set()
        self._uids = itertools.count()

    def add_moeservice(self, body: Manifest) -> Manifest:
        body = copy.deepcopy(body)
        body["metadata"].update(namespace="models", uid="moe-uid", generation=1)
        self.objects[contract.PLURAL] = {body["metadata"]["name"]: body}
        return body

    def find(self, kind: str, namespace: str, selector: str) -> list[Manifest]:
        key, value = selector.split("=")
        return [
            copy.deepcopy(o) for o in self.objects[kind].values() if o["metadata"]["labels"].get(key) == value
        ]

    def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        found = self.objects[kind].get(name)
        return copy.deepcopy(found) if found else None

    def create(self, kind: str, namespace: str, body: Manifest) -> Manifest | None:
        name = body["metadata"]["name"]
        if name in self.refuse:
            raise Rejected(f"POST {kind}: HTTP 403: admission refused {name}")
        if name in self.objects[kind]:
            return None
        obj = copy.deepcopy(body)
        obj["metadata"]["uid"] = f"uid-{next(self._uids)}"
        if kind == "pods":
            obj["status"] = {"phase": "Pending"}
        self.objects[kind][name] = obj
        self.writes.append(("create", kind, name))
        return copy.deepcopy(obj)

    def patch(self, kind: str, namespace: str, name: str, patch: Manifest, subresource: str = "") -> bool:
        if name not in self.objects[kind]:
            return False
        _merge(self.objects[kind][name], patch)
        self.writes.append((f"patch{'/' + subresource if subresource else ''}", kind, name))
        return True

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> None:
        obj = self.objects[kind].get(name)
        if obj is not None and (uid is None or obj["metadata"]["uid"] == uid):
            del self.objects[kind][name]
            self.writes.append(("delete", kind, name))

    # -- what the kubelet (kwok) would do

    def run_pods(self) -> None:
        for pod in self.objects["pods"].values():
            pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}

    def fail_model_check(self, name: str, message: str, finished_at: str) -> None:
        """What the kubelet writes when the `model-check` init container of a Never-restart pod fails."""
        terminated = {"exitCode": 1, "reason": "Error", "message": message, "finishedAt": finished_at}
        self.objects["pods"][name]["status"] = {
            "phase": "Failed",
            "initContainerStatuses": [{"name": "model-check", "state": {"terminated": terminated}}],
            "conditions": [{"type": "Ready", "status": "False"}],
        }

    def pods(self, role: str) -> dict[str, str]:
        """name -> uid of the pods of `role`."""
        return {
            n: p["metadata"]["uid"]
            for n, p in self.objects["pods"].items()
            if p["metadata"]["labels"][contract.LABEL_ROLE] == role
        }

    def status(self, name: str = "demo") -> Manifest:
        status: Manifest = self.objects[contract.PLURAL][name]["status"]
        return status

    def condition(self, kind: str, name: str = "demo") -> Manifest:
        return next(c for c in self.status(name)["conditions"] if c["type"] == kind)


def _merge(target: Manifest, patch: Manifest) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Events = list[tuple[str, str, str]]


@pytest.fixture
def dashboard() -> Iterator[FakeDashboard]:
    fake = FakeDashboard()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def reconciler(
    kube: FakeKube, url: str, clock: Clock | None = None, wall_clock: Clock | None = None
) -> tuple[Reconciler, Events]:
    settings = OperatorSettings(
        namespaces=("models",), dashboard_url_template=url, dashboard_retry_max_s=8, model_retry_s=60
    )
    events: Events = []

    def emit(body: Any, event_type: str, reason: str, message: str) -> None:
        events.append((event_type, reason, message))

    r = Reconciler(kube, ServeClient(timeout_s=2), settings, emit, clock or Clock(), wall_clock or Clock())  # type: ignore[arg-type]
    return r, events


def closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def reconcile(r: Reconciler, kube: FakeKube, name: str = "demo") -> Manifest:
    return r.reconcile(kube.objects[contract.PLURAL][name]).status


def test_first_pass_creates_every_child_the_second_records_group_sizes_then_nothing_is_written() -> None:
    kube = FakeKube()
    kube.add_moeservice(moeservice(replicas=2))
    r, events = reconciler(kube, closed_port_url())
    reconcile(r, kube)
    created = sorted(name for verb, _, name in kube.writes if verb == "create")
    assert created == sorted(
        ["demo", "demo-head", "demo-serve-config", "demo-head", "demo-ray-auth"]
        + [f"demo-attention-{i}" for i in range(4)]
        + [f"demo-expert-{i}" for i in range(4)]
    )
    expert = kube.objects["pods"]["demo-expert-3"]["metadata"]["annotations"]
    assert expert[contract.ANNOTATION_HEAD_UID] == kube.objects["pods"]["demo-head"]["metadata"]["uid"]
    assert {reason for _, reason, _ in events} == {"RayHeadCreated", "WorkerGroupCreated"}
    kube.writes.clear()
    reconcile(r, kube)  # the groups are complete: their members record the size
    assert {(verb, kind) for verb, kind, _ in kube.writes} == {("patch", "pods")} and len(kube.writes) == 8
    recorded = kube.objects["pods"]["demo-expert-3"]["metadata"]["annotations"]
    assert recorded[contract.ANNOTATION_GROUP_SIZE] == "4"
    kube.writes.clear()
    reconcile(r, kube)
    assert kube.writes == []


def test_status_says_which_pods_it_waits_for_and_then_that_the_dashboard_is_unreachable() -> None:
    kube = FakeKube()
    kube.add_moeservice(moeservice())
    url = closed_port_url()
    r, events = reconciler(kube, url)
    status = reconcile(r, kube)
    assert status["phase"] == "Progressing" and status["observedGeneration"] == 1
    ready = kube.condition("Ready")
    assert ready["reason"] == "WaitingForPods"
    assert "head 0/1 running; attention 0/2 running; expert 0/2 running" in ready["message"]
    assert kube.condition("Progressing")["status"] == "True"
    kube.run_pods()
    status = reconcile(r, kube)
    ready = kube.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RayDashboardUnreachable")
    assert f"{url}/api/serve/applications/ is unreachable" in ready["message"]
    assert kube.condition("Progressing")["reason"] == "WaitingForRay"
    assert kube.condition("Degraded")["status"] == "False"
    assert (status["replicas"], status["readyReplicas"], status["endpoint"]) == (1, 0, "demo.models.svc:9000")


def test_an_unreachable_dashboard_is_retried_with_doubling_waits() -> None:
    kube = FakeKube()
    kube.add_moeservice(moeservice())
    clock = Clock()
    r, _ = reconciler(kube, closed_port_url(), clock)
    calls: list[float] = []
    sync = r.serve.sync

    def counting_sync(*args: Any) -> Any:
        calls.append(clock.now)
        return sync(*args)

    r.serve.sync = counting_sync  # type: ignore[method-assign]
    reconcile(r, kube)
    kube.run_pods()
    for _ in range(40):  # a pass every 0.5 s for 20 s
        reconcile(r, kube)
        clock.now += 0.5
    gaps = [b - a for a, b in zip(calls[:-1], calls[1:], strict=True)]
    assert gaps == [1.0, 2.0, 4.0, 8.0], gaps  # capped at dashboard_retry_max_s = 8


def test_the_serve_application_is_deployed_once_and_running_makes_the_service_ready(
    dashboard: FakeDashboard,
) -> None:
    kube = FakeKube()
    kube.add_moeservice(moeservice(experts={"placement": [[0, 1], [2, 3]]}))
    r, events = reconciler(kube, dashboard.url)
    reconcile(r, kube)
    kube.run_pods()
    reconcile(r, kube)
    (put,) = dashboard.puts
    assert put["grpc_options"]["port"] == 9000
    assert put["applications"][0]["args"]["placement"] == [[0, 1], [2, 3]]
    assert kube.condition("Ready")["reason"] == "ServeApplicationDeploying"
    assert ("Normal", "ServeDeployed") in {(t, reason) for t, reason, _ in events}
    dashboard.applications[contract.SERVE_APP_NAME]["status"] = "RUNNING"
    status = reconcile(r, kube)
    assert len(dashboard.puts) == 1  # unchanged config: no second PUT
    token = base64.b64decode(kube.objects["secrets"]["demo-ray-auth"]["data"]["token"]).decode()
    assert len(token) == 64 and dashboard.authorizations == [f"Bearer {token}"] * 3
    ready = kube.condition("Ready")
    assert (ready["status"], ready["message"]) == ("True", "serving on demo.models.svc:9000")
    assert (status["phase"], status["readyReplicas"]) == ("Ready", 1)
    assert ("Normal", "Ready", "serving on demo.models.svc:9000") in events


def test_a_failed_serve_application_degrades_the_service(dashboard: FakeDashboard) -> None:
    kube = FakeKube()
    kube.add_moeservice(moeservice())
    dashboard.status_after_put = "DEPLOY_FAILED"
    r, events = reconciler(kube, dashboard.url)
    reconcile(r, kube)
    kube.run_pods()
    reconcile(r, kube)
    reconcile(r, kube)
    assert kube.condition("Degraded")["reason"] == "ServeApplicationFailed"
    assert kube.status()["phase"] == "Degraded"
    assert ("Warning", "ServeApplicationFailed") in {(t, reason) for t, reason, _ in events}


def test_a_lost_expert_pod_restarts_the_expert_group_only() -> None:
    kube = FakeKube()
    kube.add_moeservice(moeservice())
    r, events = reconciler(kube, closed_port_url())
    reconcile(r, kube)
    kube.run_pods()
    reconcile(r, kube)
    attention, experts = kube.pods("attention"), kube.pods("expert")
    del kube.objects["pods"]["demo-expert-1"]
    reconcile(r, kube)
    assert kube.pods("expert") == {}  # the survivor went too
    assert kube.condition("Degraded")["reason"] == "WorkerGroupRestart"
    assert (
        "Warning",
        "WorkerGroupRestart",
        "restarting the expert group of 2 pods: pod demo-expert-1 is gone",
    ) in events
    reconcile(r, kube)
    assert set(kube.pods("expert")) == set(experts) and not set(kube.pods("expert").values()) & set(
        experts.values()
    )
    assert kube.pods("attention") == attention


def test_scaling_resizes_the_groups_without_restarting_them() -> None:
    kube = FakeKube()
    body = kube.add_moeservice(moeservice())
    r, _ = reconciler(kube, closed_port_url())
    reconcile(r, kube)
    kube.run_pods()
    before = kube.pods("attention")
    body["spec"]["replicas"] = 3
    reconcile(r, kube)
    after = kube.pods("attention")
    assert len(after) == 6 and all(after[n] == uid for n, uid in before.items())
    assert len(kube.pods("expert")) == 6
    body["spec"]["replicas"] = 1
    reconcile(r, kube)
    assert kube.pods("attention") == before
    assert (
        kube.objects["pods"]["demo-attention-0"]["metadata"]["annotations"][contract.ANNOTATION_GROUP_SIZE]
        == "2"
    )


def test_a_new_image_replaces_the_head_and_then_both_groups() -> None:
    kube = FakeKube()
    body = kube.add_moeservice(moeservice())
    r, _ = reconciler(kube, closed_port_url())
    reconcile(r, kube)
    kube.run_pods()
    old = {**kube.pods("head"), **kube.pods("attention"), **kube.pods("expert")}
    body["spec"]["image"] = "registry.invalid/moeserve:v2"
    for _ in range(3):
        reconcile(r, kube)
    new = {**kube.pods("head"), **kube.pods("attention"), **kube.pods("expert")}
    assert set(new) == set(old) and not set(new.values()) & set(old.values())
    images = {p["spec"]["containers"][0]["image"] for p in kube.objects["pods"].values()}
    assert images == {"registry.invalid/moeserve:v2"}


def test_an_unrealisable_placement_is_degraded_and_makes_nothing() -> None:
    kube = FakeKube()
    kube.add_moeservice(moeservice(experts={"placement": [[0, 1], [1, 2]]}))
    r, events = reconciler(kube, closed_port_url())
    outcome = r.reconcile(kube.objects[contract.PLURAL]["demo"])
    assert outcome.invalid_spec == "spec does not validate: placement: experts [1] are hosted more than once"
    degraded = kube.condition("Degraded")
    assert (degraded["status"], degraded["reason"], degraded["message"]) == (
        "True",
        "InvalidSpec",
        outcome.invalid_spec,
    )
    assert kube.objects["pods"] == {} and kube.status()["phase"] == "Degraded"
    assert ("Warning", "InvalidSpec", outcome.invalid_spec) in events


def test_drift_is_patched_back_and_a_refused_child_is_reported() -> None:
    kube = FakeKube()
    kube.add_moeservice(moeservice())
    r, _ = reconciler(kube, closed_port_url())
    reconcile(r, kube)
    kube.objects["services"]["demo"]["spec"]["ports"][0]["port"] = 1234
    kube.objects["configmaps"]["demo-serve-config"]["data"]["stray"] = "x"
    kube.writes.clear()
    reconcile(r, kube)
    assert ("patch", "services", "demo") in kube.writes and (
        "patch",
        "configmaps",
        "demo-serve-config",
    ) in kube.writes
    assert kube.objects["services"]["demo"]["spec"]["ports"][0]["port"] == 9000
    assert "stray" not in kube.objects["configmaps"]["demo-serve-config"]["data"]
    del kube.objects["pods"]["demo-head"]
    kube.refuse.add("demo-head")
    reconcile(r, kube)
    degraded = kube.condition("Degraded")
    assert degraded["reason"] == "ChildRejected" and "admission refused demo-head" in degraded["message"]


@pytest.mark.parametrize(
    "status, body, retry_after, kind, delay",
    [
        (429, {"message": "slow down"}, "7", Retryable, 7.0),
        (503, {"message": "etcd timeout"}, None, Retryable, 2.0),
        (409, {"reason": "Conflict", "message": "the object has been modified"}, None, Retryable, 2.0),
        (422, {"reason": "Invalid", "message": 'Pod "x" is invalid'}, None, Rejected, None),
        (403, {"reason": "Forbidden", "message": "exceeded quota"}, None, Rejected, None),
    ],
)
def test_api_failures_are_classified_for_retry_or_report(
    status: int, body: Manifest, retry_after: str | None, kind: type, delay: float | None
) -> None:
    error = _classify("POST", "/api/v1/namespaces/m/pods", status, json.dumps(body).encode(), retry_after)
    assert isinstance(error, kind) and body["message"] in str(error) and f"HTTP {status}" in str(error)
    if delay is not None:
        assert isinstance(error, Retryable) and error.delay_s == delay


def test_the_ray_auth_token_is_made_once_and_every_ray_pod_reads_it() -> None:
    kube = FakeKube()
    kube.add_moeservice(moeservice())
    r, _ = reconciler(kube, closed_port_url())
    reconcile(r, kube)
    secret = kube.objects["secrets"]["demo-ray-auth"]
    assert [ref["uid"] for ref in secret["metadata"]["ownerReferences"]] == ["moe-uid"]
    kube.objects["secrets"]["demo-ray-auth"]["data"]["token"] = base64.b64encode(b"rotated-by-hand").decode()
    kube.writes.clear()
    reconcile(r, kube)
    assert not [w for w in kube.writes if w[1] == "secrets"]  # never rewritten
    for pod in kube.objects["pods"].values():
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "demo-ray-auth", "key": "token"}


def serve_label(kube: FakeKube) -> str | None:
    label: str | None = kube.objects["pods"]["demo-head"]["metadata"]["labels"].get(
        contract.LABEL_SERVE_READY
    )
    return label


def test_the_head_carries_the_serve_label_exactly_while_the_application_runs(
    dashboard: FakeDashboard,
) -> None:
    kube = FakeKube()
    body = kube.add_moeservice(moeservice())
    r, _ = reconciler(kube, dashboard.url)
    reconcile(r, kube)
    kube.run_pods()
    reconcile(r, kube)  # deployed: DEPLOYING
    assert serve_label(kube) is None
    client = kube.objects["services"]["demo"]["spec"]["selector"]
    assert client[contract.LABEL_SERVE_READY] == "true" and client[contract.LABEL_ROLE] == "head"
    dashboard.applications[contract.SERVE_APP_NAME]["status"] = "RUNNING"
    reconcile(r, kube)
    assert serve_label(kube) == "true"
    kube.writes.clear()
    reconcile(r, kube)
    assert kube.writes == []  # set once
    dashboard.applications[contract.SERVE_APP_NAME]["status"] = "UNHEALTHY"
    reconcile(r, kube)
    assert serve_label(kube) is None
    dashboard.applications[contract.SERVE_APP_NAME]["status"] = "RUNNING"
    reconcile(r, kube)
    assert serve_label(kube) == "true"
    # an expert pod lost: the group restarts, the Serve application cannot serve meanwhile
    del kube.objects["pods"]["demo-expert-0"]
    reconcile(r, kube)
    assert kube.condition("Degraded")["reason"] == "WorkerGroupRestart" and serve_label(kube) is None
    reconcile(r, kube)
    kube.run_pods()
    reconcile(r, kube)
    assert serve_label(kube) == "true"
    # Ray cannot be asked: the label stays as it was (the head's readiness probe covers a dead head)
    dashboard.server.shutdown()
    dashboard.server.server_close()
    body["spec"]["replicas"] = 1  # any pass
    reconcile(r, kube)
    assert kube.condition("Ready")["reason"] == "RayDashboardUnreachable" and serve_label(kube) == "true"


MISSING = "model unavailable at /models/tiny: no such directory (is the model volume bound and populated?)"


def test_a_pod_without_its_model_is_held_with_a_condition_naming_the_path_then_retried() -> None:
    kube = FakeKube()
    kube.add_moeservice(moeservice())
    wall = Clock()
    wall.now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    r, events = reconciler(kube, closed_port_url(), wall_clock=wall)
    reconcile(r, kube)
    kube.run_pods()
    reconcile(r, kube)
    experts = kube.pods("expert")
    kube.fail_model_check("demo-expert-1", MISSING + "\n", "2027-01-15T07:59:58Z")
    for _ in range(3):
        status = reconcile(r, kube)
        wall.now += 10
    assert kube.pods("expert") == experts  # kept: no restart loop while the model is missing
    for kind in ("Ready", "Progressing", "Degraded"):
        assert kube.condition(kind)["reason"] == "ModelUnavailable"
    degraded = kube.condition("Degraded")
    assert degraded["status"] == "True" and status["phase"] == "Degraded"
    assert degraded["message"] == f"expert pod demo-expert-1: {MISSING} (checked again every 60 s)"
    assert ("Warning", "ModelUnavailable", degraded["message"]) in events
    assert not [e for e in events if e[1] == "WorkerGroupRestart"]
    wall.now = 1_800_000_000.0 + 58  # 60 s after the check finished
    reconcile(r, kube)
    assert kube.pods("expert") == {}  # the group restarts and checks again
    restart = [e for e in events if e[1] == "WorkerGroupRestart"]
    assert restart[0][2] == f"restarting the expert group of 2 pods: pod demo-expert-1 failed: {MISSING}"
    reconcile(r, kube)
    assert set(kube.pods("expert")) == set(experts)


def test_a_spec_change_replaces_a_pod_held_for_its_model_at_once() -> None:
    kube = FakeKube()
    body = kube.add_moeservice(moeservice())
    wall = Clock()
    wall.now = 1_800_000_000.0
    r, _ = reconciler(kube, closed_port_url(), wall_clock=wall)
    reconcile(r, kube)
    kube.run_pods()
    kube.fail_model_check("demo-head", MISSING, "2027-01-15T08:00:00Z")
    reconcile(r, kube)
    assert kube.condition("Degraded")["message"].startswith(f"head pod demo-head: {MISSING}")
    head = kube.pods("head")
    body["spec"]["model"]["volume"] = {"persistentVolumeClaim": {"claimName": "models"}}
    reconcile(r, kube)
    assert kube.pods("head") == {}
    reconcile(r, kube)
    (pod,) = kube.objects["pods"]["demo-head"]["spec"]["volumes"][-1:]
    assert pod == {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    assert kube.pods("head").keys() == head.keys() and kube.pods("head") != head
