"""What to do with one group of operator-made pods: create, delete, or restart it as a unit.

`plan_group` compares the pods that exist (`PodState`) with the group they should form: `size` pods
named by index, made from the template with hash `template_hash`, bound to the Ray head pod
`head_uid`. The rules:
- A member is broken when it failed or exited, is being deleted, was made from another template (a
  spec change), or joined another head. A desired index is lost when it is missing although a member
  says the group is at least that big: a pod that was part of the complete group and went away.
  Members record that size (`moeserve.io/group-size`) only once the group is complete, so a group
  whose creation was interrupted (an operator killed, a pod refused by admission) is completed, not
  restarted. A broken member or a lost index restarts the group: delete every member, create nothing
  until all are gone, then create the whole group afresh (a Ray/torch world is replaced as a whole).
- Otherwise missing indices that no member claims are created (first creation, scale up, completing
  an interrupted creation), pods beyond `size` are deleted (scale down), and once nothing is missing,
  members whose recorded size differs get the group's size.
- Except: a member whose `model-check` init container failed (the model is not readable in it) is
  kept, and nothing of its group changes, for `hold_s` after that container finished, so the status
  can say so instead of flapping through restarts; then the group restarts and checks again. A spec
  change (another template) replaces it at once.
The head is a group of one with `head_uid=None` (bound to nothing).

Pure: this module reads pod manifests and returns a plan; `reconcile.py` carries it out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from moeserve import contract

GONE_PHASES = ("Failed", "Succeeded")
SILENT_WAITING = ("ContainerCreating", "PodInitializing")
"""Container waiting reasons that say nothing beyond "starting"."""


@dataclass(frozen=True)
class PodState:
    """What the planner needs to know about one existing pod."""

    name: str
    uid: str
    index: int
    phase: str = "Pending"
    ready: bool = False
    terminating: bool = False
    template_hash: str = ""
    head_uid: str = ""
    group_size: int = 0
    waiting_reason: str = ""
    """Why it is not running yet: the scheduler's `0/4 nodes are available: ...`, a container's
    `ErrImagePull: ...`, or the init container it is in."""
    model_error: str = ""
    """The termination message of its failed `model-check` init container; "" when it did not fail."""
    finished_at: float = 0.0
    """When that container finished (Unix time; 0 when unknown)."""
    exit_reason: str = ""
    """How a container of a failed pod ended, e.g. `ray-expert exited with code 1 (Error): ...`."""

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> PodState:
        meta = pod["metadata"]
        annotations = meta.get("annotations") or {}
        status = pod.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        model_error, finished_at = _model_check_failure(status)
        return cls(
            name=meta["name"],
            uid=meta.get("uid", ""),
            index=_int(meta.get("labels", {}).get(contract.LABEL_INDEX), 0),
            phase=status.get("phase", "Pending"),
            ready=conditions.get("Ready", {}).get("status") == "True",
            terminating=bool(meta.get("deletionTimestamp")),
            template_hash=annotations.get(contract.ANNOTATION_TEMPLATE_HASH, ""),
            head_uid=annotations.get(contract.ANNOTATION_HEAD_UID, ""),
            group_size=_int(annotations.get(contract.ANNOTATION_GROUP_SIZE), 0),
            waiting_reason=_waiting_reason(status, conditions.get("PodScheduled", {})),
            model_error=model_error,
            finished_at=finished_at,
            exit_reason=_exit_reason(status),
        )

    @property
    def running(self) -> bool:
        return self.phase == "Running" and self.ready and not self.terminating


@dataclass(frozen=True)
class GroupPlan:
    create: tuple[int, ...] = ()
    """Indices to create."""
    delete: tuple[PodState, ...] = ()
    """Pods to delete (by name and uid)."""
    resize: tuple[PodState, ...] = ()
    """Members whose recorded group size to set to the group's size (only for a complete group)."""
    restart: str = ""
    """Why the whole group is being replaced; "" when it is not."""
    waiting: tuple[str, ...] = field(default=())
    """Pods still terminating that block creation."""
    model_unavailable: str = ""
    """`pod: message` of a member held because its model check failed; "" when none is."""


def plan_group(
    pods: Sequence[PodState],
    size: int,
    template_hash: str,
    head_uid: str | None,
    name: Callable[[int], str],
    bound: bool = True,
    now: float = 0.0,
    hold_s: float = 0.0,
) -> GroupPlan:
    """The next step for a group that should have `size` pods (see the module docstring).

    `name(i)` is the name of member i. `bound`: members must have joined the head pod `head_uid`;
    with `head_uid` None (no head yet, or one going away) every member is broken and nothing is made.
    `now` (Unix time) and `hold_s`: how long a member whose model check failed is kept.
    """
    members = [p for p in pods if p.index < size]
    extra = tuple(p for p in pods if p.index >= size and not p.terminating)
    terminating = tuple(p.name for p in members if p.terminating)
    reason = _replace_reason(template_hash, members, head_uid, bound)
    if not reason:
        held = [p for p in members if p.phase == "Failed" and p.model_error and now - p.finished_at < hold_s]
        if held:
            return GroupPlan(delete=extra, model_unavailable=f"{held[0].name}: {held[0].model_error}")
        reason = _failure_reason(size, members, name)
    if reason:
        doomed = tuple(p for p in pods if not p.terminating)
        return GroupPlan(delete=doomed, restart=reason, waiting=terminating)
    if bound and head_uid is None:
        return GroupPlan(delete=extra)
    present = {p.index for p in members}
    create = tuple(i for i in range(size) if i not in present)
    resize = () if create else tuple(p for p in members if p.group_size != size)
    return GroupPlan(create=create, delete=extra, resize=resize)


def _replace_reason(
    template_hash: str, members: Sequence[PodState], head_uid: str | None, bound: bool
) -> str:
    """Why members must go whatever state they are in (deleted, another spec, another head)."""
    for pod in members:
        if pod.terminating:
            return f"pod {pod.name} is being deleted"
        if pod.template_hash != template_hash:
            return f"pod {pod.name} runs an older spec"
        if bound and pod.head_uid != head_uid:
            return f"pod {pod.name} joined a Ray head that is gone"
    return ""


def _failure_reason(size: int, members: Sequence[PodState], name: Callable[[int], str]) -> str:
    """Why a current group is broken: a member ended, or a member of the complete group is gone."""
    for pod in members:
        if pod.phase in GONE_PHASES:
            why = pod.model_error or pod.exit_reason
            detail = f": {why}" if why else ""
            return f"pod {pod.name} {pod.phase.lower()}{detail}"
    present = {p.index for p in members}
    claimed = max((p.group_size for p in members), default=0)
    lost = [i for i in range(min(size, claimed)) if i not in present]
    if lost:
        return f"pod {name(lost[0])} is gone"
    return ""


def _model_check_failure(status: Mapping[str, Any]) -> tuple[str, float]:
    """(termination message, finish time) of a failed `model-check` init container, or ("", 0)."""
    for container in status.get("initContainerStatuses") or []:
        done = (container.get("state") or {}).get("terminated") or {}
        if container.get("name") == contract.MODEL_CHECK_CONTAINER and done and done.get("exitCode") != 0:
            message = " ".join(str(done.get("message") or "").split())
            reason = message or f"exited with code {done.get('exitCode')} ({done.get('reason', 'Error')})"
            return reason[:500], _timestamp(done.get("finishedAt"))
    return "", 0.0


def _exit_reason(status: Mapping[str, Any]) -> str:
    """The first container (init containers first) that ended with a non-zero code, described."""
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        done = (container.get("state") or {}).get("terminated") or {}
        if done and done.get("exitCode") != 0:
            code, reason = done.get("exitCode"), done.get("reason", "Error")
            line = f"{container.get('name')} exited with code {code} ({reason})"
            message = " ".join(str(done.get("message") or "").split())
            return f"{line}: {message}"[:300] if message else line
    return ""


def _waiting_reason(status: Mapping[str, Any], scheduled: Mapping[str, Any]) -> str:
    if scheduled.get("status") == "False":
        return f"{scheduled.get('reason', 'Unschedulable')}: {scheduled.get('message', '')}".strip()
    inits = status.get("initContainerStatuses") or []
    for container in [*inits, *(status.get("containerStatuses") or [])]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") and waiting["reason"] not in SILENT_WAITING:
            return f"{container.get('name')}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    for container in inits:
        if (container.get("state") or {}).get("running") is not None:
            return f"in init container {container.get('name')}"
    return ""


def _timestamp(text: Any) -> float:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return 0.0


def _int(text: Any, default: int) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return default
