"""Worker-group planning: create, scale, and restart as a unit, never a duplicate."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from moeserve.operator.groups import GroupPlan, PodState, plan_group

pytestmark = pytest.mark.unit

HASH, HEAD = "tmpl-1", "head-uid-1"


def name(i: int) -> str:
    return f"demo-expert-{i}"


def member(i: int, size: int = 4, **changes: Any) -> PodState:
    pod = PodState(
        name=name(i),
        uid=f"uid-{i}",
        index=i,
        phase="Running",
        ready=True,
        template_hash=HASH,
        head_uid=HEAD,
        group_size=size,
    )
    return replace(pod, **changes)


def plan(pods: list[PodState], size: int = 4, head: str | None = HEAD) -> GroupPlan:
    return plan_group(pods, size, HASH, head, name)


def test_an_empty_group_is_created_whole() -> None:
    assert plan([]) == GroupPlan(create=(0, 1, 2, 3))


def test_a_complete_group_is_left_alone() -> None:
    assert plan([member(i) for i in range(4)]) == GroupPlan()


def test_losing_any_member_restarts_the_whole_group() -> None:
    for lost in (0, 3):  # the last one too: the survivors remember the group had 4
        survivors = [member(i) for i in range(4) if i != lost]
        result = plan(survivors)
        assert result.restart == f"pod {name(lost)} is gone"
        assert result.delete == tuple(survivors) and result.create == ()


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"phase": "Failed"}, "pod demo-expert-2 failed"),
        ({"phase": "Succeeded"}, "pod demo-expert-2 succeeded"),
        ({"terminating": True}, "pod demo-expert-2 is being deleted"),
        ({"template_hash": "tmpl-0"}, "pod demo-expert-2 runs an older spec"),
        ({"head_uid": "head-uid-0"}, "pod demo-expert-2 joined a Ray head that is gone"),
    ],
)
def test_a_broken_member_restarts_the_whole_group(change: dict[str, Any], reason: str) -> None:
    pods = [member(i, **(change if i == 2 else {})) for i in range(4)]
    result = plan(pods)
    assert result.restart == reason and result.create == ()
    assert {p.name for p in result.delete} == {name(i) for i in range(4)} - (
        {name(2)} if "terminating" in change else set()
    )


def test_a_restart_creates_nothing_until_every_old_member_is_gone() -> None:
    terminating = [member(i, terminating=True) for i in range(4)]
    result = plan(terminating)
    assert result.restart and result.delete == () and result.create == ()
    assert result.waiting == tuple(name(i) for i in range(4))
    assert plan([]) == GroupPlan(create=(0, 1, 2, 3))  # then all of them come back at once


def test_without_a_head_members_go_and_none_are_made() -> None:
    assert plan([], head=None) == GroupPlan()
    result = plan([member(0), member(1)], head=None)
    assert "Ray head that is gone" in result.restart and len(result.delete) == 2


def test_scaling_up_adds_members_without_a_restart_and_then_records_the_size() -> None:
    old = [member(i, size=2) for i in range(2)]
    assert plan(old, size=4) == GroupPlan(create=(2, 3))
    new = [member(2, size=0), member(3, size=0)]
    assert plan(old + new, size=4) == GroupPlan(resize=(*old, *new))


def test_scaling_down_removes_the_top_members_and_ignores_them_while_they_terminate() -> None:
    pods = [member(i) for i in range(4)]
    result = plan(pods, size=2)
    assert result.delete == (member(2), member(3)) and not result.restart
    assert result.resize == (member(0), member(1))
    leaving = [member(0, size=2), member(1, size=2), member(2, terminating=True), member(3, terminating=True)]
    assert plan(leaving, size=2) == GroupPlan()


def test_a_group_interrupted_while_being_created_is_completed_not_restarted() -> None:
    # An operator killed (or a pod refused) after creating 2 of 4 members, which claim no size yet.
    assert plan([member(0, size=0), member(1, size=0)]) == GroupPlan(create=(2, 3))


def test_pod_state_reads_phase_readiness_annotations_and_scheduling_trouble() -> None:
    pod = {
        "metadata": {
            "name": "demo-expert-3",
            "uid": "u",
            "labels": {"moeserve.io/index": "3"},
            "annotations": {
                "moeserve.io/template-hash": HASH,
                "moeserve.io/head-uid": HEAD,
                "moeserve.io/group-size": "4",
            },
        },
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/4 nodes"}
            ],
        },
    }
    state = PodState.from_pod(pod)
    assert (state.index, state.group_size, state.template_hash, state.head_uid) == (3, 4, HASH, HEAD)
    assert not state.running and state.waiting_reason == "Unschedulable: 0/4 nodes"


def pod_with(status: dict[str, Any]) -> PodState:
    meta = {"name": "demo-expert-0", "uid": "u", "labels": {"moeserve.io/index": "0"}}
    return PodState.from_pod({"metadata": meta, "status": status})


def test_a_failed_model_check_is_read_from_the_init_container_status() -> None:
    terminated = {
        "exitCode": 1,
        "reason": "Error",
        "message": "model unavailable at /m: no config.json readable by uid 1000\n",
        "finishedAt": "2027-01-15T08:00:00Z",
    }
    state = pod_with(
        {
            "phase": "Failed",
            "initContainerStatuses": [{"name": "model-check", "state": {"terminated": terminated}}],
        }
    )
    assert state.model_error == "model unavailable at /m: no config.json readable by uid 1000"
    assert state.finished_at == 1_800_000_000.0
    silent = {**terminated, "message": "", "exitCode": 137, "reason": "OOMKilled"}
    status = {
        "phase": "Failed",
        "initContainerStatuses": [{"name": "model-check", "state": {"terminated": silent}}],
    }
    assert pod_with(status).model_error == "exited with code 137 (OOMKilled)"
    passed = {**terminated, "exitCode": 0}
    status = {
        "phase": "Running",
        "initContainerStatuses": [{"name": "model-check", "state": {"terminated": passed}}],
    }
    assert pod_with(status).model_error == ""


@pytest.mark.parametrize(
    "status, reason",
    [
        (
            {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/4 nodes",
                    }
                ]
            },
            "Unschedulable: 0/4 nodes",
        ),
        (
            {
                "initContainerStatuses": [
                    {
                        "name": "model-check",
                        "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "not present"}},
                    }
                ]
            },
            "model-check: ErrImageNeverPull: not present",
        ),
        (
            {
                "initContainerStatuses": [
                    {"name": "model-check", "state": {"terminated": {"exitCode": 0}}},
                    {"name": "wait-for-head", "state": {"running": {"startedAt": "2027-01-15T08:00:00Z"}}},
                ],
                "containerStatuses": [
                    {"name": "ray-expert", "state": {"waiting": {"reason": "PodInitializing"}}}
                ],
            },
            "in init container wait-for-head",
        ),
        (
            {
                "containerStatuses": [
                    {"name": "ray-expert", "state": {"waiting": {"reason": "ContainerCreating"}}}
                ]
            },
            "",
        ),
    ],
)
def test_why_a_pod_waits_names_the_scheduler_the_image_or_the_init_step(
    status: dict[str, Any], reason: str
) -> None:
    assert pod_with({"phase": "Pending", **status}).waiting_reason == reason


def held(i: int, finished_at: float) -> PodState:
    return member(
        i, phase="Failed", ready=False, model_error="model unavailable at /m: x", finished_at=finished_at
    )


def test_a_member_whose_model_check_failed_holds_its_group_until_the_hold_expires() -> None:
    pods = [member(0), held(1, finished_at=1000.0), member(2), member(3)]
    kept = plan_group(pods, 4, HASH, HEAD, name, now=1059.0, hold_s=60)
    assert kept == GroupPlan(model_unavailable="demo-expert-1: model unavailable at /m: x")
    expired = plan_group(pods, 4, HASH, HEAD, name, now=1060.0, hold_s=60)
    assert expired.restart == "pod demo-expert-1 failed: model unavailable at /m: x"
    assert {p.name for p in expired.delete} == {name(i) for i in range(4)}
    # a new spec, or a head that is gone, replaces it at once
    newer = plan_group(pods, 4, "tmpl-2", HEAD, name, now=1001.0, hold_s=60)
    assert newer.restart == "pod demo-expert-0 runs an older spec"
    assert plan_group(pods, 4, HASH, "head-uid-2", name, now=1001.0, hold_s=60).restart.endswith(
        "joined a Ray head that is gone"
    )
    # scaling down while held still removes the extra pods
    extra = plan_group([*pods, member(4), member(5)], 4, HASH, HEAD, name, now=1001.0, hold_s=60)
    assert [p.name for p in extra.delete] == [name(4), name(5)] and extra.model_unavailable


def test_a_failed_pod_says_which_container_ended_how() -> None:
    terminated = {"exitCode": 137, "reason": "OOMKilled", "message": ""}
    state = pod_with(
        {
            "phase": "Failed",
            "containerStatuses": [{"name": "ray-expert", "state": {"terminated": terminated}}],
        }
    )
    assert state.exit_reason == "ray-expert exited with code 137 (OOMKilled)"
    pods = [replace(member(0), phase="Failed", exit_reason=state.exit_reason), member(1)]
    assert (
        plan(pods, size=2).restart == "pod demo-expert-0 failed: ray-expert exited with code 137 (OOMKilled)"
    )
