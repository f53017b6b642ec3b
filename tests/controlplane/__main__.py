"""Command line for the test control plane: `python -m tests.controlplane up|down|status`.

`up` starts a control plane that outlives the command (its processes are detached, not tied to this
Python process) and prints the admin kubeconfig path on stdout; `down` stops everything recorded in
the state directory and deletes it; `status` prints each component's pid and whether it runs.
It does not build anything: run `bash tests/controlplane/build.sh` first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cluster import ControlPlane, MissingBinariesError, StartError, remove_state
from .processes import Supervisor


def default_state_dir() -> Path:
    return Path(os.environ.get("MOESERVE_CONTROLPLANE_STATE", f"/tmp/moeserve-controlplane-{os.getuid()}"))


def _supervisor(state_dir: Path) -> Supervisor:
    return Supervisor(state_dir / "pids", state_dir / "logs", die_with_parent=False)


def _running(state_dir: Path) -> bool:
    return (state_dir / "pids").is_dir() and any(r.alive() for r in _supervisor(state_dir).records())


def up(state_dir: Path) -> int:
    if _running(state_dir):
        print(f"already up (state in {state_dir}); run `down` first to restart", file=sys.stderr)
        print(state_dir / "kubeconfig")
        return 0
    remove_state(state_dir)  # a stale directory from a crashed run: its etcd data would clash
    plane = ControlPlane(state_dir, die_with_parent=False)
    try:
        plane.start()
    except (MissingBinariesError, StartError) as err:
        plane.stop()
        print(f"controlplane up failed: {err}", file=sys.stderr)
        return 1
    print(f"control plane up at {plane.server}; logs in {plane.log_dir}", file=sys.stderr)
    print(plane.kubeconfig)
    return 0


def down(state_dir: Path) -> int:
    if not state_dir.exists():
        print(f"nothing to stop ({state_dir} does not exist)", file=sys.stderr)
        return 0
    killed = _supervisor(state_dir).stop_all()
    if killed:
        print(f"needed SIGKILL: {', '.join(killed)}", file=sys.stderr)
    remove_state(state_dir)
    print(f"stopped; removed {state_dir}", file=sys.stderr)
    return 0


def status(state_dir: Path) -> int:
    if not (state_dir / "pids").is_dir():
        print(f"down (no state in {state_dir})")
        return 1
    records = _supervisor(state_dir).records()
    for record in records:
        print(f"{record.name:26} pid {record.pid:<8} {'running' if record.alive() else 'EXITED'}")
    state_file = state_dir / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        print(f"server     {state['server']}\nkubeconfig {state['kubeconfig']}")
    return 0 if records and all(r.alive() for r in records) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.controlplane", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="where pids, logs, certificates and kubeconfigs live "
        "(default: $MOESERVE_CONTROLPLANE_STATE or /tmp/moeserve-controlplane-$UID)",
    )
    args = parser.parse_args(argv)
    return {"up": up, "down": down, "status": status}[args.command](args.state_dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
