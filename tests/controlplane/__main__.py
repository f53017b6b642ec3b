"""Command line for the test control plane: `python -m tests.controlplane up|down|status`.

`up` starts a control plane that outlives the command (its processes are detached, not tied to this
Python process) and prints the admin kubeconfig path on stdout; with `--real-node` it also runs the
real node (kubelet, containerd, CNI, kube-proxy, CoreDNS) with the project's image imported, and
prints the image reference on a second line. `down` stops everything recorded in the state
directory, restores what the real node changed on the host, and deletes the directory; `status`
prints each component's pid and whether it runs. It does not build anything: run
`bash tests/controlplane/ci.sh` (or build.sh, build.sh --node, images.sh) first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cluster import DEFAULT_NODES, ControlPlane, MissingBinariesError, StartError, remove_state
from .node import stop_node
from .processes import Supervisor


def default_state_dir() -> Path:
    return Path(os.environ.get("MOESERVE_CONTROLPLANE_STATE", f"/tmp/moeserve-controlplane-{os.getuid()}"))


def _supervisor(state_dir: Path) -> Supervisor:
    return Supervisor(state_dir / "pids", state_dir / "logs", die_with_parent=False)


def _running(state_dir: Path) -> bool:
    return (state_dir / "pids").is_dir() and any(r.alive() for r in _supervisor(state_dir).records())


def up(state_dir: Path, real_node: bool) -> int:
    if _running(state_dir):
        print(f"already up (state in {state_dir}); run `down` first to restart", file=sys.stderr)
        print(state_dir / "kubeconfig")
        return 0
    if (state_dir / "node").exists():
        down(state_dir)  # a crashed real node: restore the host before starting again
    remove_state(state_dir)  # a stale directory from a crashed run: its etcd data would clash
    plane = ControlPlane(
        state_dir,
        die_with_parent=False,
        nodes=() if real_node else DEFAULT_NODES,
        real_node=real_node,
        node_images=("base", "moeserve"),
        node_lock_timeout_s=0.0,
    )
    try:
        plane.start()
    except (MissingBinariesError, StartError) as err:
        print(f"controlplane up failed: {err}", file=sys.stderr)
        return 1
    print(f"control plane up at {plane.server}; logs in {plane.log_dir}", file=sys.stderr)
    print(plane.kubeconfig)
    if plane.real_node:
        print(f"real node {plane.real_node.node_name} up; image of this checkout:", file=sys.stderr)
        print(plane.real_node.images["moeserve"].ref)
    return 0


def down(state_dir: Path) -> int:
    if not state_dir.exists():
        print(f"nothing to stop ({state_dir} does not exist)", file=sys.stderr)
        return 0
    supervisor = _supervisor(state_dir)
    left = stop_node(state_dir, supervisor)
    if left:
        print("real node cleanup: " + "; ".join(left), file=sys.stderr)
    killed = supervisor.stop_all()
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
    if not records:
        print(f"down (nothing recorded in {state_dir})")
        return 1
    for record in records:
        print(f"{record.name:26} pid {record.pid:<8} {'running' if record.alive() else 'EXITED'}")
    state_file = state_dir / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        print(f"server     {state['server']}\nkubeconfig {state['kubeconfig']}")
    return 0 if all(r.alive() for r in records) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.controlplane", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument(
        "--real-node",
        action="store_true",
        help="up: a real node (kubelet, containerd, kube-proxy, CoreDNS) instead of kwok's fake nodes, "
        "with the images of tests/controlplane/images.sh imported (needs root)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="where pids, logs, certificates and kubeconfigs live "
        "(default: $MOESERVE_CONTROLPLANE_STATE or /tmp/moeserve-controlplane-$UID)",
    )
    args = parser.parse_args(argv)
    state_dir = args.state_dir.resolve()
    if args.command == "up":
        return up(state_dir, args.real_node)
    return {"down": down, "status": status}[args.command](state_dir)


if __name__ == "__main__":
    sys.exit(main())
