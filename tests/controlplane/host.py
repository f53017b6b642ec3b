"""What a real node changes on the host, recorded before it starts and undone after it stops.

A kubelet, containerd, the CNI plugins and kube-proxy change host state that outlives them: sysctls
(kubelet sets vm.overcommit_memory, kernel.panic, kernel.panic_on_oops; the bridge plugin turns on
IPv4 forwarding), mounts (container root filesystems, secret tmpfs, network namespaces under
/run/netns), nftables tables (kube-proxy; iptables-nft for the portmap plugin), cgroups (kubepods),
network links (the bridge and pod veths) and directories (/var/lib/cni, /run/containerd, ...).

`HostSnapshot.take()` records the pieces of that state we may touch (a JSON file in the state
directory, so that `python -m tests.controlplane down` can restore it from another process) and
`restore()` undoes, after every node process has stopped, whatever differs: unmount what is mounted
under our directories, delete network namespaces, links and nft tables that did not exist, remove
the kubepods cgroups, put sysctls back, and remove directories that did not exist. Only what did not
exist before is deleted; nothing that was there is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.default.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.ipv6.conf.all.forwarding",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)

# Directories a node may create outside its state directory (some paths are fixed in the binaries:
# containerd 1.6 puts shim sockets in /run/containerd/s, CRI puts network namespaces in /run/netns,
# libcni caches results in /var/lib/cni, kubelet links container logs in /var/log/containers).
WATCHED_DIRS = (
    "/run/netns",
    "/run/containerd",
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/etc/cni",
    "/opt/cni",
    "/opt/containerd",
)
LINK_PREFIXES = ("moeserve", "veth")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_NAMES = ("kubepods", "kubepods.slice")


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def read_sysctl(key: str) -> str | None:
    try:
        return _sysctl_path(key).read_text().strip()
    except OSError:
        return None


def _nft_tables() -> list[str]:
    """'family name' of every nftables table."""
    if shutil.which("nft") is None:
        return []
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    return [line.removeprefix("table ").strip() for line in out.splitlines() if line.startswith("table ")]


def _links() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


def _mounts() -> list[str]:
    """Mount points, in mount order (from /proc/self/mountinfo; octal escapes decoded)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        points.append(point.encode().decode("unicode_escape"))
    return points


def _cgroup_trees() -> list[Path]:
    trees = []
    for hierarchy in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else []:
        for name in CGROUP_NAMES:
            if (hierarchy / name).is_dir():
                trees.append(hierarchy / name)
        if hierarchy.name in CGROUP_NAMES:  # cgroup v2 mounted at /sys/fs/cgroup itself
            trees.append(hierarchy)
    return trees


def _entries(path: str) -> list[str] | None:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


@dataclass
class HostSnapshot:
    sysctls: dict[str, str | None] = field(default_factory=dict)
    nft_tables: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    dirs: dict[str, list[str] | None] = field(default_factory=dict)
    """Each watched directory's entries, None where it did not exist."""

    @classmethod
    def take(cls) -> HostSnapshot:
        return cls(
            sysctls={key: read_sysctl(key) for key in SYSCTLS},
            nft_tables=_nft_tables(),
            links=_links(),
            mounts=_mounts(),
            cgroups=[str(p) for p in _cgroup_trees()],
            dirs={d: _entries(d) for d in WATCHED_DIRS},
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> HostSnapshot:
        return cls(**json.loads(path.read_text()))

    def restore(self, owned_roots: list[Path]) -> list[str]:
        """Undo what changed since the snapshot; return what could not be undone (empty: all clean).

        `owned_roots` are directories that belong to the node alone (its state directory, the
        containerd state directory): everything mounted under them is unmounted.
        """
        problems: list[str] = []
        self._unmount(owned_roots, problems)
        self._remove_netns(problems)
        self._delete_links(problems)
        self._delete_nft_tables(problems)
        self._remove_cgroups(problems)
        self._restore_sysctls(problems)
        self._remove_dirs(problems)
        return problems

    # -- the steps, in an order where each one's prerequisites are gone ---------------------------

    def _unmount(self, owned_roots: list[Path], problems: list[str]) -> None:
        roots = [str(r).rstrip("/") + "/" for r in owned_roots]
        before = set(self.mounts)
        new_netns = [d for d in self._new_entries("/run/netns")]
        targets = [
            m
            for m in _mounts()
            if m not in before
            and (any(m.startswith(r) for r in roots) or m in new_netns or m == "/run/netns")
        ]
        for point in reversed(targets):  # children before parents
            done = subprocess.run(["umount", point], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                lazy = subprocess.run(["umount", "-l", point], capture_output=True, text=True, check=False)
                if lazy.returncode != 0:
                    problems.append(f"umount {point}: {done.stderr.strip()}")

    def _new_entries(self, directory: str) -> list[str]:
        old = self.dirs.get(directory) or []
        return [f"{directory}/{e}" for e in (_entries(directory) or []) if e not in old]

    def _remove_netns(self, problems: list[str]) -> None:
        for path in self._new_entries("/run/netns"):
            try:
                os.unlink(path)
            except OSError as err:
                problems.append(f"remove network namespace {path}: {err}")

    def _delete_links(self, problems: list[str]) -> None:
        for link in _links():
            # Only what a node creates: its bridges and the host ends of pod veths.
            if link in self.links or not link.startswith(LINK_PREFIXES):
                continue
            done = subprocess.run(["ip", "link", "delete", link], capture_output=True, text=True, check=False)
            if done.returncode != 0 and Path(f"/sys/class/net/{link}").exists():
                problems.append(f"ip link delete {link}: {done.stderr.strip()}")

    def _delete_nft_tables(self, problems: list[str]) -> None:
        for table in _nft_tables():
            if table in self.nft_tables:
                continue
            family, name = table.split(maxsplit=1)
            done = subprocess.run(
                ["nft", "delete", "table", family, name], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                problems.append(f"nft delete table {table}: {done.stderr.strip()}")

    def _remove_cgroups(self, problems: list[str]) -> None:
        for tree in _cgroup_trees():
            if str(tree) in self.cgroups:
                continue
            # Leaves first; a cgroup directory is removed with rmdir, never by deleting its files.
            for dirpath, _dirs, _files in sorted(os.walk(tree), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError as err:
                    problems.append(f"rmdir cgroup {dirpath}: {err}")
                    break

    def _restore_sysctls(self, problems: list[str]) -> None:
        for key, value in self.sysctls.items():
            if value is None or read_sysctl(key) == value:
                continue
            try:
                _sysctl_path(key).write_text(value + "\n")
            except OSError as err:
                problems.append(f"sysctl {key}={value}: {err}")

    def _remove_dirs(self, problems: list[str]) -> None:
        for directory, entries in self.dirs.items():
            if not os.path.lexists(directory):
                continue
            if entries is None:
                shutil.rmtree(directory, ignore_errors=True)
                if os.path.lexists(directory):
                    problems.append(f"could not remove {directory}")
                continue
            for path in self._new_entries(directory):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.unlink(path)
                    except OSError as err:
                        problems.append(f"remove {path}: {err}")

    def differences(self, owned_roots: list[Path]) -> list[str]:
        """What differs from the snapshot now (for tests that the host was left as it was).

        Mounts count only under `owned_roots` and the watched directories: other programs on the
        machine (an image build, other tests) mount things of their own meanwhile."""
        now = HostSnapshot.take()
        diffs = []
        for key, value in self.sysctls.items():
            if now.sysctls.get(key) != value:
                diffs.append(f"sysctl {key}: {value} -> {now.sysctls.get(key)}")
        for name, old, new in (
            ("nft tables", self.nft_tables, now.nft_tables),
            ("links", self.links, now.links),
            ("cgroups", self.cgroups, now.cgroups),
        ):
            if sorted(old) != sorted(new):
                diffs.append(f"{name}: {sorted(old)} -> {sorted(new)}")
        roots = tuple(str(r).rstrip("/") + "/" for r in [*owned_roots, *map(Path, WATCHED_DIRS)])
        extra_mounts = [m for m in now.mounts if m not in self.mounts and (m + "/").startswith(roots)]
        if extra_mounts:
            diffs.append(f"new mounts: {extra_mounts}")
        for directory, entries in self.dirs.items():
            if now.dirs.get(directory) != entries:
                diffs.append(f"{directory}: {entries} -> {now.dirs.get(directory)}")
        return diffs
