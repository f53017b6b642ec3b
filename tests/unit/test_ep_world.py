"""World layout names, the watchdog that ends a process stuck in a collective, and the rendezvous
store listening on one address only, and ranks proving they hold the instance's secret."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import psutil
import pytest

from moeserve.workers.parallel.world import (
    CollectiveError,
    Watchdog,
    WorldLayout,
    host_store,
    init_world,
    new_secret,
)

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


def test_the_rendezvous_store_listens_on_the_given_address_only() -> None:
    store = host_store("127.0.0.1", 5.0)
    listening = [c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert ("127.0.0.1", store.port) in [(a.ip, a.port) for a in listening]
    assert all(a.ip == "127.0.0.1" for a in listening if a.port == store.port)
    port = store.port
    del store  # the store owns the socket: dropping it stops listening
    assert not [
        c
        for c in psutil.Process().net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


def _join(rank: int, port: int, secret: bytes, results: Any) -> None:
    try:
        init_world(rank, WorldLayout(1, 1), "127.0.0.1", port, secret, "gloo", 10.0, 30.0)
        results.put((rank, "joined"))
    except CollectiveError as e:
        results.put((rank, str(e)))


def test_a_rank_without_the_instance_secret_is_refused_by_every_rank() -> None:
    """(Ranks that all hold it join: every expert-parallel serving test does.)"""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "moeserve.workers.parallel.world"])
    store = host_store("127.0.0.1", 30.0)
    secret = new_secret()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_join, args=(r, store.port, new_secret() if r == 1 else secret, results))
        for r in range(2)
    ]
    for proc in procs:
        proc.start()
    got = dict(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(30)
    assert got[0].startswith("rank 1 does not hold this instance's secret")
    assert got[1].startswith("rank 0 does not hold")  # to the intruder, everyone else is wrong
