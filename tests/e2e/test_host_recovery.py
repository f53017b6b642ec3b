"""A real node that a killed run left behind is cleared before the next one starts.

A CI job killed at its time limit never runs its fixture's teardown: its processes die with it
(PR_SET_PDEATHSIG) but the bridge, mounts and nft tables stay, and the next run's
`ip link add moeserve-node` failed with "File exists". These tests leave such a node behind by hand
(while holding the host lock, as a real run does) and check that `clear_abandoned_node` undoes it all.

They take the host lock themselves, so they run before the session's real node starts (this file
sorts before the others of the tier) or wait for it to stop.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.host import HostSnapshot
from tests.controlplane.node import CNI_BRIDGE, NODE_LINK, HostLock, clear_abandoned_node
from tests.controlplane.processes import PidRecord, Supervisor

pytestmark = pytest.mark.e2e

LOCK_TIMEOUT_S = 600.0
ABANDONED_TABLE = ("ip", "moeserve_abandoned_test")


def _sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(argv)} failed: {done.stderr.strip()}"


def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _mounted(point: Path) -> bool:
    return any(
        line.split()[4] == str(point) for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


@pytest.fixture
def host_lock() -> Iterator[HostLock]:
    for tool in ("ip", "nft", "mount"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: install it with `bash tests/controlplane/ci.sh`", pytrace=False)
    lock = HostLock()
    lock.acquire(LOCK_TIMEOUT_S)
    try:
        yield lock
    finally:
        lock.release()


def _abandon_a_node(lock: HostLock, state_dir: Path) -> PidRecord:
    """Do to the host what a node does, record it as a run does, and 'die' without a teardown."""
    node_dir = state_dir / "node"
    node_dir.mkdir(parents=True)
    lock.record(str(state_dir))
    HostSnapshot.take().save(node_dir / "host-snapshot.json")
    _sh("ip", "link", "add", NODE_LINK, "type", "bridge")
    _sh("ip", "link", "add", CNI_BRIDGE, "type", "bridge")
    _sh("nft", "add", "table", *ABANDONED_TABLE)
    rootfs = node_dir / "rootfs"
    rootfs.mkdir()
    _sh("mount", "-t", "tmpfs", "tmpfs", str(rootfs))
    # A process of the run that outlived it (recorded as the supervisor records kubelet and the rest).
    supervisor = Supervisor(state_dir / "pids", state_dir / "logs", die_with_parent=False)
    return supervisor.start("kubelet", ["sleep", "600"])


def test_an_abandoned_node_is_stopped_and_the_host_restored(host_lock: HostLock) -> None:
    before = HostSnapshot.take()
    state_dir = Path(tempfile.mkdtemp(prefix="moeserve-abandoned-"))
    try:
        leftover = _abandon_a_node(host_lock, state_dir)
        assert _link_exists(NODE_LINK) and _mounted(state_dir / "node" / "rootfs")

        cleared = clear_abandoned_node(host_lock.previous_owner())

        assert host_lock.previous_owner() == state_dir
        assert f"stopped the node abandoned in {state_dir}" in cleared
        assert not leftover.alive(), "the abandoned run's process was not ended"
        assert not _link_exists(NODE_LINK) and not _link_exists(CNI_BRIDGE)
        assert not _mounted(state_dir / "node" / "rootfs")
        assert before.differences([state_dir]) == []
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def test_a_bridge_left_without_any_records_is_deleted(host_lock: HostLock) -> None:
    before = HostSnapshot.take()
    host_lock.record("/nonexistent/moeserve-state")  # the run's state directory is gone too
    _sh("ip", "link", "add", NODE_LINK, "type", "bridge")

    cleared = clear_abandoned_node(host_lock.previous_owner())

    assert cleared == [f"deleted link {NODE_LINK}"]
    assert not _link_exists(NODE_LINK)
    assert before.differences([]) == []


def test_nothing_is_touched_when_nothing_was_abandoned(host_lock: HostLock) -> None:
    before = HostSnapshot.take()
    assert clear_abandoned_node(None) == []
    assert before.differences([]) == []
