"""MoEService status: conditions that say what is missing, stable transition times, Events."""

from __future__ import annotations

import pytest

from moeserve.operator.settings import OperatorSettings
from moeserve.operator.status import (
    GroupReport,
    Observation,
    ServeReport,
    build_status,
    model_instances,
    transitions,
)

pytestmark = pytest.mark.unit

RUNNING = (GroupReport("head", 1, 1), GroupReport("attention", 4, 4), GroupReport("expert", 2, 2))


def conditions(status: dict[str, object]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}  # type: ignore[attr-defined,index]


def test_a_condition_keeps_its_transition_time_until_its_status_flips() -> None:
    waiting = Observation(3, 2, groups=(GroupReport("head", 1, 0),))
    first = build_status(waiting, None, "t1")
    again = build_status(waiting, first, "t2")
    assert again == first
    serving = Observation(3, 2, groups=RUNNING, instances=2, serve=ServeReport("RUNNING"))
    ready = build_status(serving, again, "t3")
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times == {"Ready": "t3", "Progressing": "t3", "Degraded": "t1"}
    assert (ready["phase"], ready["replicas"], ready["readyReplicas"]) == ("Ready", 2, 2)


@pytest.mark.parametrize(
    "obs, phase, expected",
    [
        (
            Observation(1, 1, invalid_spec="bad"),
            "Degraded",
            {"Ready": ("False", "InvalidSpec"), "Degraded": ("True", "InvalidSpec")},
        ),
        (
            Observation(1, 1, rejected="quota"),
            "Degraded",
            {"Ready": ("False", "ChildRejected"), "Degraded": ("True", "ChildRejected")},
        ),
        (
            Observation(1, 0, groups=RUNNING[:1]),
            "ScaledToZero",
            {"Ready": ("False", "ScaledToZero"), "Progressing": ("False", "ScaledToZero")},
        ),
        (
            Observation(1, 1, groups=(GroupReport("expert", 2, 0, restart="pod x is gone"),)),
            "Degraded",
            {"Progressing": ("True", "RestartingWorkerGroup"), "Degraded": ("True", "WorkerGroupRestart")},
        ),
        (
            Observation(
                1,
                1,
                groups=(
                    GroupReport("head", 1, 0, model_unavailable="demo-head: model unavailable at /m: x"),
                    GroupReport("expert", 2, 0, restart="pod demo-expert-0 failed"),
                ),
            ),
            "Degraded",
            {
                "Ready": ("False", "ModelUnavailable"),
                "Progressing": ("False", "ModelUnavailable"),
                "Degraded": ("True", "ModelUnavailable"),
            },
        ),
        (
            Observation(1, 1, groups=RUNNING, serve=ServeReport("RayDashboardUnreachable", "x")),
            "Progressing",
            {"Ready": ("False", "RayDashboardUnreachable"), "Progressing": ("True", "WaitingForRay")},
        ),
        (
            Observation(1, 1, groups=RUNNING, serve=ServeReport("DEPLOYING")),
            "Progressing",
            {"Ready": ("False", "ServeApplicationDeploying")},
        ),
        (
            Observation(1, 1, groups=RUNNING, serve=ServeReport("UNHEALTHY", "replica died")),
            "Degraded",
            {"Degraded": ("True", "ServeApplicationFailed")},
        ),
    ],
)
def test_conditions_and_phase(obs: Observation, phase: str, expected: dict[str, tuple[str, str]]) -> None:
    status = build_status(obs, None, "t")
    assert status["phase"] == phase
    assert expected.items() <= conditions(status).items()


def test_waiting_message_lists_every_group_and_why_pods_wait() -> None:
    groups = (
        GroupReport("head", 1, 1),
        GroupReport("expert", 2, 1, waiting=("demo-expert-1: Unschedulable: 0/4 nodes",)),
    )
    ready = build_status(Observation(1, 1, groups=groups), None, "t")["conditions"][0]
    assert ready["message"] == (
        "waiting for pods: head 1/1 running; expert 1/2 running (demo-expert-1: Unschedulable: 0/4 nodes)"
    )


def test_transitions_post_events_only_when_conditions_change() -> None:
    progressing = build_status(Observation(1, 1, groups=(GroupReport("head", 1, 0),)), None, "t")
    ready = build_status(
        Observation(1, 1, groups=RUNNING, serve=ServeReport("RUNNING"), endpoint="e:1"), progressing, "t"
    )
    broken = build_status(Observation(1, 1, groups=(GroupReport("expert", 2, 0, restart="r"),)), ready, "t")
    assert transitions(None, progressing) == []
    assert transitions(progressing, ready) == [("Normal", "Ready", "serving on e:1")]
    assert transitions(ready, ready) == []
    assert [(t, r) for t, r, _ in transitions(ready, broken)] == [
        ("Warning", "NotReady"),
        ("Warning", "WorkerGroupRestart"),
    ]


def test_model_instances_count_complete_sets_of_ranks() -> None:
    groups = [GroupReport("attention", 6, 5), GroupReport("expert", 6, 6)]
    assert model_instances(groups, {"attention": 2, "expert": 2}, 3) == 2
    assert model_instances(groups[:1], {"attention": 2, "expert": 0}, 3) == 2


def test_settings_from_the_command_line() -> None:
    settings = OperatorSettings.from_argv(
        ["-n", "a", "--namespace", "b", "--log-level", "debug", "--reconcile-interval", "2"]
    )
    assert (
        settings.namespaces == ("a", "b")
        and settings.log_level == "DEBUG"
        and settings.reconcile_interval_s == 2
    )
    assert OperatorSettings.from_argv(["--all-namespaces"]).cluster_wide
    assert OperatorSettings.from_argv(["-A"]).model_retry_s == 60
    assert OperatorSettings.from_argv(["-A", "--model-retry-interval", "5"]).model_retry_s == 5
    for argv in (
        [],
        ["-n", "a", "-A"],
        ["-n", "a", "--reconcile-interval", "0"],
        ["-A", "--model-retry-interval=0"],
    ):
        with pytest.raises(SystemExit):
            OperatorSettings.from_argv(argv)
