"""Start long-running processes so that none outlives the run that owns it.

Each process started here runs in a new session (its own process group, so ending the group also
ends anything it spawned), writes stdout and stderr to one log file, and is recorded in a pid file
holding its pid and its kernel start time, so a later `down` from another Python process can end it
without ever signalling a recycled pid. With `die_with_parent`, the child also gets
`prctl(PR_SET_PDEATHSIG, SIGKILL)`: the kernel kills it when the thread that started it dies, even by
SIGKILL (this is what the pytest fixture uses; `python -m tests.controlplane up` does not, since its
processes must outlive the command).

This module knows nothing about Kubernetes; `cluster.py` decides what to run.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class PidRecord:
    """What identifies a started process across Python processes."""

    name: str
    pid: int
    start_time: str
    """Field 22 of /proc/<pid>/stat (clock ticks since boot): differs for a recycled pid."""
    log: str

    def alive(self) -> bool:
        return proc_start_time(self.pid) == self.start_time


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid`, or None if no such process (or only a zombie) exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # exited, waiting to be reaped: it is gone for our purposes
        return None
    return fields[19]


def _die_with(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn that makes the child get SIGKILL when the starting thread dies."""

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls into it

    def preexec() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(127)

    return preexec


class Supervisor:
    """Starts processes, records them under `pid_dir`, and ends them in reverse order."""

    def __init__(self, pid_dir: Path, log_dir: Path, die_with_parent: bool) -> None:
        self.pid_dir = pid_dir
        self.log_dir = log_dir
        self.die_with_parent = die_with_parent
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        pid_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> PidRecord:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as out:
            child = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with(os.getpid()) if self.die_with_parent else None,
                env=env,
                pass_fds=tuple(pass_fds),
            )
        self._children[child.pid] = child
        record = PidRecord(name, child.pid, proc_start_time(child.pid) or "", str(log))
        index = len(list(self.pid_dir.glob("*.json")))
        (self.pid_dir / f"{index:02d}-{name}.json").write_text(json.dumps(record.__dict__))
        return record

    def stop_all(self, grace_s: float = 10.0) -> list[str]:
        """End every recorded process group, newest first; return the names that needed SIGKILL."""
        killed = []
        for path in sorted(self.pid_dir.glob("*.json"), reverse=True):
            record = PidRecord(**json.loads(path.read_text()))
            if not stop_group(record, grace_s, self._children.pop(record.pid, None)):
                killed.append(record.name)
            path.unlink()
        return killed

    def stop_named(self, name: str, grace_s: float = 10.0) -> bool:
        """End the recorded process group called `name`; True if SIGTERM sufficed (or none runs)."""
        clean = True
        for path in sorted(self.pid_dir.glob(f"*-{name}.json")):
            record = PidRecord(**json.loads(path.read_text()))
            if record.name != name:
                continue
            clean = stop_group(record, grace_s, self._children.pop(record.pid, None)) and clean
            path.unlink()
        return clean

    def records(self) -> list[PidRecord]:
        return [PidRecord(**json.loads(p.read_text())) for p in sorted(self.pid_dir.glob("*.json"))]


def _group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is still running (zombies awaiting a reaper do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(record: PidRecord, child: subprocess.Popen[bytes] | None, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if child is not None:
            child.poll()  # reap it, or it stays a zombie member of its group
        if not record.alive() and not _group_alive(record.pid):
            return True
        time.sleep(0.05)
    return False


def stop_group(record: PidRecord, grace_s: float, child: subprocess.Popen[bytes] | None = None) -> bool:
    """SIGTERM the process group of `record`, SIGKILL it after `grace_s`. True if SIGTERM sufficed.

    The group is signalled only while its leader is the very process recorded (same start time), or
    when this Python process is its parent and holds it as `child`.
    """
    if not record.alive() and child is None:
        return True
    _signal_group(record.pid, signal.SIGTERM)
    if _wait_gone(record, child, time.monotonic() + grace_s):
        return True
    _signal_group(record.pid, signal.SIGKILL)
    _wait_gone(record, child, time.monotonic() + 5.0)
    return False
