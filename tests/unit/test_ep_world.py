"""World layout names and the watchdog that ends a process stuck in a collective."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from moeserve.workers.ep_world import Watchdog, WorldLayout

pytestmark = pytest.mark.unit


def test_layout_roles_and_names() -> None:
    layout = WorldLayout(2, 3)
    assert layout.size == 5
    assert [layout.role(r) for r in range(5)] == ["attention"] * 2 + ["expert"] * 3
    assert layout.describe(1) == "attention rank 1"
    assert layout.describe(4) == "expert rank 2 (global rank 4)"
    with pytest.raises(ValueError, match="needs >= 1 attention and >= 1 expert rank"):
        WorldLayout(1, 0)


def _stuck(conn, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    dog = Watchdog(lambda message: conn.send(message), poll_s=0.05, min_margin_s=0.2)
    with dog.watch("attention rank 0: dispatch of MoE layer 1", timeout_s):
        time.sleep(30)


def test_watchdog_ends_a_process_stuck_past_its_timeout() -> None:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_stuck, args=(child, 0.3))
    start = time.monotonic()
    proc.start()
    proc.join(20)
    assert proc.exitcode == 3
    assert time.monotonic() - start < 5
    assert parent.recv() == "watchdog: attention rank 0: dispatch of MoE layer 1 still waiting after 0.5 s"


def test_disarmed_watchdog_does_not_fire() -> None:
    fired: list[str] = []
    dog = Watchdog(fired.append, poll_s=0.02, min_margin_s=0.05)
    for _ in range(3):
        with dog.watch("step control", 0.05):
            time.sleep(0.01)
    time.sleep(0.3)
    assert fired == []
