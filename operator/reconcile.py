"""One reconcile pass of one MoEService: make the cluster match the spec, then report it.

`Reconciler.reconcile(body)` is level-based and idempotent. It derives the desired objects from the
spec (`builders`), lists what exists (by the `moeserve.io/service` label), creates what is missing,
patches what drifted, deletes what is extra or broken (worker groups restart as a unit: `groups`),
deploys the Serve application through the head's Ray dashboard once the head is ready (backing off
while the dashboard does not answer), and writes the status (`status`). A second pass, or a pass by a
restarted operator after a crash anywhere in the first, converges on the same objects: names are
deterministic and every step checks before it acts.

It raises `kube.Retryable` when the API server cannot be reached and reports everything else in the
status. It does not import kopf: `handlers.py` translates outcomes into kopf's errors and Events.
"""

from __future__ import annotations

import logging
import secrets as secrets_module
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from moeserve import contract
from moeserve.operator import builders
from moeserve.operator.builders import DesiredState, Manifest, Owner, WorkerGroup
from moeserve.operator.groups import GroupPlan, PodState, plan_group
from moeserve.operator.kube import Kube, Rejected
from moeserve.operator.ray_dashboard import DashboardError, ServeClient
from moeserve.operator.settings import OperatorSettings
from moeserve.operator.spec import MoEServiceSpec, SpecError
from moeserve.operator.status import (
    GroupReport,
    Observation,
    ServeReport,
    build_status,
    model_instances,
    transitions,
)
from moeserve.serve_config import ServeConfigError

UNKNOWN_SERVE_STATES = ("RayDashboardUnreachable", "ServeRequestFailed")
"""What the Ray dashboard did not tell: the head's serve label stays as it is."""

EventSink = Callable[[Mapping[str, Any], str, str, str], None]
"""emit(owner body, event type (Normal/Warning), reason, message)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    status: dict[str, Any]
    invalid_spec: str = ""
    """Why the spec cannot be realised; "" when it can."""


@dataclass
class _Backoff:
    """Per MoEService incarnation: when to call its Ray dashboard next."""

    failures: int = 0
    next_attempt: float = 0.0
    last: ServeReport | None = None


@dataclass
class _Actual:
    pods: list[Manifest] = field(default_factory=list)
    services: dict[str, Manifest] = field(default_factory=dict)
    config_maps: dict[str, Manifest] = field(default_factory=dict)
    secrets: dict[str, Manifest] = field(default_factory=dict)


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        serve: ServeClient,
        settings: OperatorSettings,
        emit: EventSink,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.serve = serve
        self.settings = settings
        self.emit = emit
        self.clock = clock
        self.wall_clock = wall_clock
        """Unix time, compared with the kubelet's container timestamps."""
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._queued: set[tuple[str, str]] = set()
        self._backoff: dict[str, _Backoff] = {}
        self._written: dict[str, dict[str, Any]] = {}
        """uid -> the status this process last wrote (fresher than a body read before it)."""

    # -- entry points ------------------------------------------------------------------------------

    def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        meta = body["metadata"]
        with self._locked((meta["namespace"], meta["name"])):
            return self._reconcile(body)

    def reconcile_soon(self, namespace: str, name: str) -> None:
        """Reconcile `namespace/name` after one of its pods changed, coalescing bursts: while a pass
        waits to start, further calls return at once (that pass reads the object afresh)."""
        key = (namespace, name)
        with self._guard:
            if key in self._queued:
                return
            self._queued.add(key)
        with self._locked(key):
            with self._guard:
                self._queued.discard(key)
            body = self.kube.get(contract.PLURAL, namespace, name)
            if body is not None and not body["metadata"].get("deletionTimestamp"):
                self._reconcile(body)

    def forget(self, namespace: str, name: str, uid: str) -> None:
        """Drop what this process remembers about a deleted MoEService."""
        with self._guard:
            self._locks.pop((namespace, name), None)
            self._backoff.pop(uid, None)
            self._written.pop(uid, None)

    @contextmanager
    def _locked(self, key: tuple[str, str]) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield

    # -- one pass ----------------------------------------------------------------------------------

    def _reconcile(self, body: Mapping[str, Any]) -> Outcome:
        owner = Owner.from_body(body)
        generation = int(body["metadata"].get("generation", 0))
        try:
            spec = MoEServiceSpec.from_dict(body.get("spec"))
            desired = builders.desired_state(owner, spec)
        except (SpecError, ServeConfigError) as err:
            raw_replicas = (body.get("spec") or {}).get("replicas", 1)
            replicas = raw_replicas if isinstance(raw_replicas, int) else 1
            obs = Observation(generation, replicas, invalid_spec=f"spec does not validate: {err}")
            return Outcome(self._write_status(body, owner, obs), invalid_spec=obs.invalid_spec)

        rejected = ""
        reports: list[GroupReport] = []
        serve = ServeReport("NotAttempted")
        try:
            actual = self._list(owner)
            token = self._ray_auth_token(owner, actual.secrets)
            self._ensure(owner, "configmaps", desired.config_map, actual.config_maps)
            for service in desired.services:
                self._ensure(owner, "services", service, actual.services)
            head_report, head_uid = self._head(body, owner, desired.head, actual.pods)
            reports.append(head_report)
            for group in desired.workers:
                if group.size or _pods_of(actual.pods, group.role):
                    reports.append(self._group(body, owner, group, actual.pods, head_uid))
            self._delete_strays(owner, desired, actual)
            if head_report.running and not any(r.restart for r in reports):
                serve = self._serve(body, owner, builders.serve_deploy_document(spec), token)
            self._label_serving_head(owner, actual.pods, head_uid, serve)
        except Rejected as err:
            rejected = str(err)
            log.warning("%s/%s: %s", owner.namespace, owner.name, err)
        ranks = {contract.ROLE_ATTENTION: spec.attention.ranks, contract.ROLE_EXPERT: spec.experts.ranks}
        obs = Observation(
            generation=generation,
            replicas=spec.replicas,
            endpoint=builders.endpoint(owner, spec),
            rejected=rejected,
            groups=tuple(reports),
            instances=model_instances([r for r in reports if r.role in ranks], ranks, spec.replicas),
            serve=serve,
            model_retry_s=self.settings.model_retry_s,
        )
        return Outcome(self._write_status(body, owner, obs))

    def _label_serving_head(
        self, owner: Owner, pods: Sequence[Manifest], head_uid: str | None, serve: ServeReport
    ) -> None:
        """The client Service routes to the head only while it carries the serve label: set it while
        Ray reports the application RUNNING, remove it when Ray reports anything else or the head
        cannot serve (not running, groups restarting). Left as it is when Ray could not be asked."""
        if serve.reason in UNKNOWN_SERVE_STATES:
            return
        want = contract.SERVE_READY if serve.reason == "RUNNING" else None
        for pod in _pods_of(pods, contract.ROLE_HEAD):
            meta = pod["metadata"]
            if meta.get("uid") != head_uid or meta.get("deletionTimestamp"):
                continue
            if (meta.get("labels") or {}).get(contract.LABEL_SERVE_READY) != want:
                log.info("%s/%s: serve label of %s: %s", owner.namespace, owner.name, meta["name"], want)
                patch = {"metadata": {"labels": {contract.LABEL_SERVE_READY: want}}}
                self.kube.patch("pods", owner.namespace, meta["name"], patch)

    def _list(self, owner: Owner) -> _Actual:
        selector = f"{contract.LABEL_SERVICE}={owner.name}"
        ns = owner.namespace

        def ours(items: list[Manifest]) -> list[Manifest]:
            return [item for item in items if _owned_by(item, owner)]

        return _Actual(
            pods=ours(self.kube.find("pods", ns, selector)),
            services={s["metadata"]["name"]: s for s in ours(self.kube.find("services", ns, selector))},
            config_maps={c["metadata"]["name"]: c for c in ours(self.kube.find("configmaps", ns, selector))},
            secrets={c["metadata"]["name"]: c for c in ours(self.kube.find("secrets", ns, selector))},
        )

    def _ray_auth_token(self, owner: Owner, secrets: Mapping[str, Manifest]) -> str:
        """The Ray cluster's token: from its Secret, which is created (random token) if missing and
        never rewritten: pods already started hold the token they were given."""
        name = builders.auth_secret_name(owner.name)
        secret = secrets.get(name)
        if secret is None:
            secret = self._create(owner, "secrets", builders.auth_secret(owner, secrets_module.token_hex(32)))
            if secret is None:  # made by a racing pass: read it
                secret = self.kube.get("secrets", owner.namespace, name)
            if secret is None:
                raise Rejected(f"secrets {name} vanished while being created")
        return builders.auth_token(secret)

    def _ensure(self, owner: Owner, kind: str, desired: Manifest, existing: Mapping[str, Manifest]) -> None:
        """Create `desired`, or patch the fields it sets where the existing object differs."""
        name = desired["metadata"]["name"]
        current = existing.get(name)
        if current is None:
            self._create(owner, kind, desired)
            return
        patch = _drift(desired, current)
        if patch:
            log.info("%s/%s: updating %s %s to the spec", owner.namespace, owner.name, kind, name)
            self.kube.patch(kind, owner.namespace, name, patch)

    def _create(self, owner: Owner, kind: str, manifest: Manifest) -> Manifest | None:
        created = self.kube.create(kind, owner.namespace, manifest)
        if created is not None:
            return created
        name = manifest["metadata"]["name"]
        clash = self.kube.get(kind, owner.namespace, name)
        if clash is not None and not _owned_by(clash, owner):
            raise Rejected(f"{kind} {name} already exists and is not owned by MoEService {owner.name}")
        return None  # ours after all (made by a pass that raced this one): the next pass sees it

    def _head(
        self, body: Mapping[str, Any], owner: Owner, desired: Manifest, pods: Sequence[Manifest]
    ) -> tuple[GroupReport, str | None]:
        """Keep one current head pod; return its report and the uid workers must be bound to."""
        states = [PodState.from_pod(p) for p in _pods_of(pods, contract.ROLE_HEAD)]
        name = desired["metadata"]["name"]
        plan = plan_group(
            states,
            1,
            builders.template_hash(desired),
            None,
            lambda _: name,
            bound=False,
            now=self.wall_clock(),
            hold_s=self.settings.model_retry_s,
        )
        self._delete(owner, plan)
        if plan.restart and plan.delete:
            self.emit(body, "Warning", "RayHeadRestart", f"replacing the Ray head: {plan.restart}")
        head_uid: str | None = None
        running = 0
        if plan.create:
            created = self._create(owner, "pods", desired)
            if created is not None:
                head_uid = created["metadata"]["uid"]
                self.emit(body, "Normal", "RayHeadCreated", f"created Ray head pod {name}")
        elif not plan.restart and states:
            head_uid = states[0].uid
            running = int(states[0].running)
        waiting = tuple(f"{s.name}: {s.waiting_reason}" for s in states if s.waiting_reason)
        report = GroupReport(contract.ROLE_HEAD, 1, running, plan.restart, waiting, plan.model_unavailable)
        return report, head_uid

    def _group(
        self,
        body: Mapping[str, Any],
        owner: Owner,
        group: WorkerGroup,
        pods: Sequence[Manifest],
        head_uid: str | None,
    ) -> GroupReport:
        states = [PodState.from_pod(p) for p in _pods_of(pods, group.role)]
        plan = plan_group(
            states,
            group.size,
            builders.template_hash(group.template),
            head_uid,
            lambda i: builders.worker_name(owner.name, group.role, i),
            now=self.wall_clock(),
            hold_s=self.settings.model_retry_s,
        )
        self._delete(owner, plan)
        if plan.restart and plan.delete:
            self.emit(
                body,
                "Warning",
                "WorkerGroupRestart",
                f"restarting the {group.role} group of {group.size} pods: {plan.restart}",
            )
        elif plan.delete:
            self.emit(
                body,
                "Normal",
                "WorkerGroupScaled",
                f"{group.role} group: {group.size} pods, removing " + ", ".join(p.name for p in plan.delete),
            )
        if plan.create:
            assert head_uid is not None  # plan_group creates nothing without a head
            verb = "creating" if len(plan.create) == group.size else "adding"
            self.emit(
                body,
                "Normal",
                "WorkerGroupScaled" if verb == "adding" else "WorkerGroupCreated",
                f"{group.role} group: {verb} {len(plan.create)} of {group.size} pods",
            )
            for index in plan.create:
                pod = builders.worker_pod(group, owner.name, index, head_uid)
                self._create(owner, "pods", pod)
        for state in plan.resize:
            annotations = {contract.ANNOTATION_GROUP_SIZE: str(group.size)}
            self.kube.patch("pods", owner.namespace, state.name, {"metadata": {"annotations": annotations}})
        deleted = {p.name for p in plan.delete}
        members = [s for s in states if s.index < group.size and s.name not in deleted]
        waiting = tuple(f"{s.name}: {s.waiting_reason}" for s in members if s.waiting_reason)
        if plan.waiting:
            waiting = (f"waiting for {', '.join(plan.waiting)} to terminate", *waiting)
        running = 0 if plan.restart else sum(s.running for s in members)
        return GroupReport(group.role, group.size, running, plan.restart, waiting, plan.model_unavailable)

    def _delete(self, owner: Owner, plan: GroupPlan) -> None:
        for state in plan.delete:
            self.kube.delete("pods", owner.namespace, state.name, uid=state.uid)

    def _delete_strays(self, owner: Owner, desired: DesiredState, actual: _Actual) -> None:
        """Objects with this MoEService's label and owner that no builder makes any more."""
        roles = {contract.ROLE_HEAD, *(g.role for g in desired.workers)}
        for pod in actual.pods:
            if pod["metadata"].get("labels", {}).get(contract.LABEL_ROLE) not in roles:
                self.kube.delete("pods", owner.namespace, pod["metadata"]["name"], pod["metadata"]["uid"])
        wanted = {s["metadata"]["name"] for s in desired.services}
        for name, service in actual.services.items():
            if name not in wanted:
                self.kube.delete("services", owner.namespace, name, service["metadata"]["uid"])
        for name, config_map in actual.config_maps.items():
            if name != desired.config_map["metadata"]["name"]:
                self.kube.delete("configmaps", owner.namespace, name, config_map["metadata"]["uid"])

    def _serve(self, body: Mapping[str, Any], owner: Owner, document: Manifest, token: str) -> ServeReport:
        """Sync the Serve application with the head's dashboard, at most as often as the backoff allows."""
        state = self._backoff.setdefault(owner.uid, _Backoff())
        now = self.clock()
        if state.last is not None and now < state.next_attempt:
            return state.last
        url = self.settings.dashboard_url_template.format(
            service=builders.head_name(owner.name),
            namespace=owner.namespace,
            port=contract.RAY_DASHBOARD_PORT,
        )
        try:
            result = self.serve.sync(url, document, contract.SERVE_APP_NAME, token)
        except DashboardError as err:
            state.failures += 1
            delay = min(2.0 ** (state.failures - 1), self.settings.dashboard_retry_max_s)
            state.next_attempt = now + delay
            reason = "ServeRequestFailed" if err.reachable else "RayDashboardUnreachable"
            state.last = ServeReport(reason, f"Ray dashboard: {err}")
            log.info("%s/%s: %s; next attempt in %.0fs", owner.namespace, owner.name, err, delay)
            return state.last
        state.failures, state.next_attempt, state.last = 0, 0.0, None
        if result.deployed:
            self.emit(body, "Normal", "ServeDeployed", f"{result.message} to {url}")
        return ServeReport(result.status, result.message)

    def _write_status(self, body: Mapping[str, Any], owner: Owner, obs: Observation) -> dict[str, Any]:
        previous = self._written.get(owner.uid) or body.get("status") or {}
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = build_status(obs, previous, now)
        if status != previous:
            self.kube.patch(
                contract.PLURAL, owner.namespace, owner.name, {"status": status}, subresource="status"
            )
            self._written[owner.uid] = status
            for event_type, reason, message in transitions(previous, status):
                self.emit(body, event_type, reason, message)
        return status


def _pods_of(pods: Sequence[Manifest], role: str) -> list[Manifest]:
    return [p for p in pods if p["metadata"].get("labels", {}).get(contract.LABEL_ROLE) == role]


def _owned_by(obj: Mapping[str, Any], owner: Owner) -> bool:
    return any(ref.get("uid") == owner.uid for ref in obj["metadata"].get("ownerReferences") or [])


def _drift(desired: Manifest, current: Manifest) -> Manifest:
    """A merge patch setting what `desired` sets (labels, data, spec fields) where `current` differs."""
    patch: Manifest = {}
    labels = desired["metadata"].get("labels", {})
    if any(current["metadata"].get("labels", {}).get(k) != v for k, v in labels.items()):
        patch["metadata"] = {"labels": labels}
    data, have = desired.get("data"), current.get("data") or {}
    if data is not None and have != data:
        patch["data"] = {**{k: None for k in have if k not in data}, **data}  # None removes a key
    spec = {
        k: v
        for k, v in (desired.get("spec") or {}).items()
        if _differs(v, (current.get("spec") or {}).get(k))
    }
    if spec:
        patch["spec"] = spec
    return patch


def _differs(want: Any, have: Any) -> bool:
    """Whether `have` (as the API server returns it, with defaults filled in) lacks what `want` sets."""
    if isinstance(want, Mapping):
        return not isinstance(have, Mapping) or any(_differs(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return (
            not isinstance(have, list)
            or len(want) != len(have)
            or any(_differs(w, h) for w, h in zip(want, have, strict=True))
        )
    return bool(want != have)
