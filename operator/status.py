"""A MoEService's status, as a pure function of what one reconcile pass observed.

`build_status` turns an `Observation` into the `status` object: `observedGeneration`, `phase`, the
conditions `Ready`, `Progressing` and `Degraded` (each with reason and a message that says what is
missing), `replicas` (model instances whose pods all run), `readyReplicas` (instances serving) and
`endpoint`. `transitions` lists the Events worth posting when conditions change. No I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"
FAILED_SERVE_STATES = ("DEPLOY_FAILED", "UNHEALTHY")


@dataclass(frozen=True)
class GroupReport:
    role: str
    size: int
    running: int
    restart: str = ""
    """Why the group is being replaced as a unit; "" when it is not."""
    waiting: tuple[str, ...] = ()
    """Why pods are not running yet (scheduler messages)."""
    model_unavailable: str = ""
    """`pod: message` of a member whose model check failed (groups.GroupPlan.model_unavailable)."""


@dataclass(frozen=True)
class ServeReport:
    reason: str
    """NotAttempted, RayDashboardUnreachable, ServeRequestFailed, or Ray's application status."""
    message: str = ""


@dataclass(frozen=True)
class Observation:
    generation: int
    replicas: int
    endpoint: str = ""
    invalid_spec: str = ""
    rejected: str = ""
    """The API server refused a child object (admission, quota, RBAC); its message."""
    groups: tuple[GroupReport, ...] = ()
    """The head (a group of one) first, then the worker groups."""
    instances: int = 0
    serve: ServeReport = ServeReport("NotAttempted")
    model_retry_s: float = 0.0
    """How long a group whose model check failed waits before it checks again (for the message)."""


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def conditions(obs: Observation) -> tuple[Condition, Condition, Condition]:
    """(Ready, Progressing, Degraded) for `obs`, first matching rule wins."""

    def of(
        ready: tuple[bool, str, str], progressing: tuple[bool, str, str], degraded: tuple[bool, str, str]
    ) -> Any:
        return (
            Condition(READY, *ready),
            Condition(PROGRESSING, *progressing),
            Condition(DEGRADED, *degraded),
        )

    fine = (False, "AsExpected", "")
    if obs.invalid_spec:
        bad = (False, "InvalidSpec", obs.invalid_spec)
        return of(
            bad, (False, "InvalidSpec", "waiting for a valid spec"), (True, "InvalidSpec", obs.invalid_spec)
        )
    if obs.rejected:
        msg = f"the API server refused an object: {obs.rejected}"
        return of((False, "ChildRejected", msg), (False, "ChildRejected", msg), (True, "ChildRejected", msg))
    missing = [g for g in obs.groups if g.model_unavailable]
    if missing:
        msg = "; ".join(f"{g.role} pod {g.model_unavailable}" for g in missing)
        if obs.model_retry_s:
            msg += f" (checked again every {obs.model_retry_s:g} s)"
        bad = (False, "ModelUnavailable", msg)
        return of(bad, bad, (True, "ModelUnavailable", msg))
    restarts = [f"{g.role} group restarts: {g.restart}" for g in obs.groups if g.restart]
    if restarts:
        msg = "; ".join(restarts)
        return of(
            (False, "WorkerGroupRestart", msg),
            (True, "RestartingWorkerGroup", msg),
            (True, "WorkerGroupRestart", msg),
        )
    if obs.replicas == 0:
        msg = "spec.replicas is 0: the Ray head runs, no model instance does"
        return of((False, "ScaledToZero", msg), (False, "ScaledToZero", msg), fine)
    if any(g.running < g.size for g in obs.groups):
        msg = "waiting for pods: " + "; ".join(_group_line(g) for g in obs.groups)
        return of((False, "WaitingForPods", msg), (True, "CreatingPods", msg), fine)
    serve = obs.serve
    if serve.reason == "RayDashboardUnreachable":
        msg = f"{serve.message}; the Serve application is not deployed yet"
        return of((False, serve.reason, msg), (True, "WaitingForRay", msg), fine)
    if serve.reason == "ServeRequestFailed":
        return of(
            (False, serve.reason, serve.message),
            (False, serve.reason, serve.message),
            (True, serve.reason, serve.message),
        )
    if serve.reason == "RUNNING":
        msg = f"serving on {obs.endpoint}"
        return of((True, "ServeApplicationRunning", msg), (False, "Reconciled", msg), fine)
    msg = f"Serve application {serve.reason}: {serve.message}".rstrip(": ")
    if serve.reason in FAILED_SERVE_STATES:
        return of(
            (False, "ServeApplicationFailed", msg),
            (False, "ServeApplicationFailed", msg),
            (True, "ServeApplicationFailed", msg),
        )
    return of((False, "ServeApplicationDeploying", msg), (True, "DeployingServeApplication", msg), fine)


def build_status(obs: Observation, previous: Mapping[str, Any] | None, now: str) -> dict[str, Any]:
    """The status object; a condition keeps its lastTransitionTime while its status is unchanged."""
    ready, progressing, degraded = conditions(obs)
    old = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    rendered = [_render(c, old.get(c.type), now, obs.generation) for c in (ready, progressing, degraded)]
    if degraded.status:
        phase = "Degraded"
    elif ready.status:
        phase = "Ready"
    elif obs.replicas == 0:
        phase = "ScaledToZero"
    else:
        phase = "Progressing"
    return {
        "observedGeneration": obs.generation,
        "phase": phase,
        "conditions": rendered,
        "replicas": obs.instances,
        "readyReplicas": obs.instances if ready.status else 0,
        "endpoint": obs.endpoint,
    }


def transitions(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(event type, reason, message) for condition changes worth an Event."""
    old = {c["type"]: c for c in (previous or {}).get("conditions") or []}
    new = {c["type"]: c for c in current["conditions"]}
    events = []
    was, now = old.get(READY, {}), new[READY]
    if now["status"] == "True" and was.get("status") != "True":
        events.append(("Normal", "Ready", now["message"]))
    elif now["status"] != "True" and was.get("status") == "True":
        events.append(("Warning", "NotReady", f"{now['reason']}: {now['message']}"))
    was, now = old.get(DEGRADED, {}), new[DEGRADED]
    if now["status"] == "True" and (was.get("status") != "True" or was.get("reason") != now["reason"]):
        events.append(("Warning", now["reason"], now["message"]))
    return events


def model_instances(groups: Sequence[GroupReport], ranks: Mapping[str, int], replicas: int) -> int:
    """Model instances whose pods all run: each needs `ranks[role]` running pods of every group."""
    counts = [g.running // ranks[g.role] for g in groups if ranks.get(g.role)]
    return min([replicas, *counts])


def _group_line(group: GroupReport) -> str:
    line = f"{group.role} {group.running}/{group.size} running"
    if group.waiting:
        line += f" ({group.waiting[0]})"
    return line


def _render(cond: Condition, old: Mapping[str, Any] | None, now: str, generation: int) -> dict[str, Any]:
    status = "True" if cond.status else "False"
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    return {
        "type": cond.type,
        "status": status,
        "reason": cond.reason,
        "message": cond.message,
        "lastTransitionTime": since or now,
        "observedGeneration": generation,
    }
