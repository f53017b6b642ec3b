"""One real node for the test control plane: containerd + runc, CNI (bridge, host-local, portmap),
kubelet, kube-proxy (nftables mode) and CoreDNS, all on this machine and nowhere else.

Addresses (all private, created here; nothing is sent off the machine):
- NODE_IP 10.250.0.1/32 on a bridge `moeserve-node` with no ports: the node's InternalIP, where the
  kube-apiserver, the kubelet's server and CoreDNS listen, so that pods can reach them too (a pod's
  traffic to it is delivered locally, through the pod bridge's gateway).
- POD_CIDR 10.244.0.0/24 on the CNI bridge `moeserve-cni0`; Services in 10.96.0.0/16 (kube-proxy),
  cluster DNS at DNS_IP 10.96.0.10 (a selector-less Service `kube-system/kube-dns` whose
  EndpointSlice points at CoreDNS on NODE_IP:53). CoreDNS answers cluster.local only; it forwards
  nothing.

containerd keeps its image store in the build cache (`~/.cache/moeserve/containerd`), so the images
from images.sh are imported once, not per run; everything else lives in the state directory or
/run/moeserve-containerd and goes away with `stop()`. The host state the node changes is recorded
first and restored after (see host.py). Only one real node can run on a host at a time: a lock file
is held by containerd (inherited descriptor) for as long as it runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .api import ApiClient, ApiError, Credentials, JsonObject, write_kubeconfig
from .host import HostSnapshot
from .pki import Pki
from .processes import Supervisor, proc_start_time
from .waiting import wait_until

HERE = Path(__file__).resolve().parent
NODE_NAME = "moeserve-node"
NODE_IP = "10.250.0.1"
NODE_LINK = "moeserve-node"
CNI_BRIDGE = "moeserve-cni0"
CNI_NETWORK = "moeserve-pods"
POD_CIDR = "10.244.0.0/24"
DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
CONTAINERD_STATE = Path("/run/moeserve-containerd")
"""containerd's state (sockets, runc state, network namespaces, task bundles); removed on stop."""
CONTAINERD_SOCKET = CONTAINERD_STATE / "containerd.sock"
HOST_LOCK = Path("/run/moeserve-real-node.lock")
CNI_BIN_DIR = Path("/usr/lib/cni")
NODE_LABELS = {
    "topology.kubernetes.io/zone": "zone-a",
    "moeserve.io/rack": "rack-0",
    "moeserve.io/real-node": "true",
}

BUILD_NODE_COMMAND = "bash tests/controlplane/build.sh --node"
IMAGES_COMMAND = "bash tests/controlplane/images.sh"
APT_COMMAND = (
    "apt-get install -y containerd runc containernetworking-plugins nftables iptables conntrack "
    "buildah debootstrap (or: bash tests/controlplane/ci.sh)"
)
NODE_BINARIES = ("kubelet", "kube-proxy", "coredns")
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "nft", "iptables", "ip", "mount")
CNI_PLUGINS = ("bridge", "host-local", "portmap", "loopback")
# The order node processes stop in: nothing may lose its runtime before its containers are gone.
STOP_ORDER = ("coredns", "kube-proxy", "kubelet")


class RealNodeError(RuntimeError):
    """Something the real node needs is missing or did not come up; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moeserve"


def containerd_root() -> Path:
    return cache_root() / "containerd"


def locate_node_binaries() -> Path:
    override = os.environ.get("MOESERVE_NODE_BIN")
    if override:
        bin_dir, origin = Path(override), "MOESERVE_NODE_BIN"
    else:
        out = subprocess.run(
            ["bash", str(HERE / "build.sh"), "--node", "--print-bin-dir"],
            capture_output=True,
            text=True,
            check=True,
        )
        bin_dir, origin = Path(out.stdout.strip()), "the build cache"
    missing = [name for name in NODE_BINARIES if not (bin_dir / name).is_file()]
    if missing:
        raise RealNodeError(
            f"real-node binaries missing from {origin} ({bin_dir}): {', '.join(missing)}. "
            f"Build them once with `{BUILD_NODE_COMMAND}` (about 5 minutes on 2 cores, then cached)."
        )
    return bin_dir


@dataclass(frozen=True)
class Image:
    name: str
    ref: str
    layout: Path
    """The OCI image layout (directory) images.sh writes it to."""

    def built(self) -> bool:
        """Whether the layout holds this ref (images.sh keeps only the current build there)."""
        try:
            index = json.loads((self.layout / "index.json").read_text())
        except OSError:
            return False
        names = [
            m.get("annotations", {}).get("org.opencontainers.image.ref.name") for m in index["manifests"]
        ]
        return self.ref in names


IMAGE_OVERRIDE = "MOESERVE_E2E_IMAGE"
"""Environment variable: a moeserve image ref that images.sh built earlier, used instead of this
checkout's (to iterate on tests while the code changes; CI never sets it)."""


def image_refs() -> dict[str, Image]:
    """The images this checkout's images.sh builds (refs are content hashes), by name."""
    out = subprocess.run(
        ["bash", str(HERE / "images.sh"), "--print-refs"], capture_output=True, text=True, check=True
    )
    images = {
        name: Image(name, entry["ref"], Path(entry["layout"]))
        for name, entry in json.loads(out.stdout).items()
    }
    override = os.environ.get(IMAGE_OVERRIDE)
    if override:
        images["moeserve"] = Image("moeserve", override, images["moeserve"].layout)
    return images


def check_host_tools() -> None:
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    missing += [f"{CNI_BIN_DIR}/{p}" for p in CNI_PLUGINS if not (CNI_BIN_DIR / p).is_file()]
    if missing:
        raise RealNodeError(f"the real node needs {', '.join(missing)}: install them with `{APT_COMMAND}`")
    if os.geteuid() != 0:
        raise RealNodeError("the real node needs root (kubelet, containerd, network setup): run as root")


def _run(*argv: str, timeout_s: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    if check and done.returncode != 0:
        raise RealNodeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[:2000]}")
    return done


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class HostLock:
    """An exclusive lock on HOST_LOCK; the descriptor is handed to containerd so it outlives us."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def acquire(self, timeout_s: float) -> None:
        fd = os.open(HOST_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    holder = HOST_LOCK.read_text().strip() if HOST_LOCK.exists() else "?"
                    raise RealNodeError(
                        f"another real node runs on this host (lock {HOST_LOCK}, state {holder}); waited "
                        f"{timeout_s:.0f}s. Stop it with `python -m tests.controlplane down --state-dir DIR`."
                    ) from None
                time.sleep(1.0)
        self.fd = fd

    def previous_owner(self) -> Path | None:
        """The state directory the last holder recorded (the file outlives it), if any."""
        assert self.fd is not None
        recorded = os.pread(self.fd, 4096, 0).decode(errors="replace").strip()
        return Path(recorded) if recorded else None

    def record(self, owner: str) -> None:
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, owner.encode() + b"\n", 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RealNode:
    """The node's processes and files, rooted at `state_dir/node`; started by `ControlPlane`."""

    def __init__(self, state_dir: Path, supervisor: Supervisor, images: tuple[str, ...] = ("base",)) -> None:
        self.state_dir = state_dir
        self.dir = state_dir / "node"
        self.supervisor = supervisor
        self.wanted_images = images
        self.lock = HostLock()
        self.bin_dir: Path | None = None
        self.images: dict[str, Image] = {}
        self.kubelet_port = 0
        self.ports: dict[str, int] = {}
        self.recovered: list[str] = []
        """What `prepare` cleared of a node that an earlier, killed run left behind."""
        self.host_before: HostSnapshot | None = None
        """The host as `prepare` found it (after that clearing), before the node changed anything."""

    # -- before the control plane starts ---------------------------------------------------------

    @property
    def node_name(self) -> str:
        return NODE_NAME

    def prepare(self, lock_timeout_s: float) -> None:
        """Check prerequisites, take the host lock, record the host, add NODE_IP. Raises RealNodeError."""
        check_host_tools()
        self.bin_dir = locate_node_binaries()
        self.images = image_refs()
        missing = [
            f"{self.images[n].ref} ({self.images[n].layout})"
            for n in ("pause", *self.wanted_images)
            if not self.images[n].built()
        ]
        if missing:
            raise RealNodeError(
                f"images not built: {', '.join(missing)}. Build them with `{IMAGES_COMMAND}` "
                "(the moeserve image takes about 10 minutes the first time, then it is cached)."
            )
        self.lock.acquire(lock_timeout_s)
        # Holding the lock means no node of ours runs; anything of one still here was abandoned.
        self.recovered = clear_abandoned_node(self.lock.previous_owner())
        self.lock.record(str(self.state_dir))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_before = HostSnapshot.take()
        self.host_before.save(self.dir / "host-snapshot.json")
        (self.dir / "node.json").write_text(json.dumps({"containerd_state": str(CONTAINERD_STATE)}) + "\n")
        _run("ip", "link", "add", NODE_LINK, "type", "bridge")
        _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", NODE_LINK)
        _run("ip", "link", "set", NODE_LINK, "up")

    # -- after the control plane is up -----------------------------------------------------------

    def start(self, server: str, pki: Pki, admin: ApiClient, deadline: float) -> None:
        assert self.bin_dir is not None
        kubeconfigs = {
            name: write_kubeconfig(
                self.dir / f"kubeconfig-{name}",
                server,
                pki.ca.cert,
                Credentials(pki.clients[name].cert, pki.clients[name].key),
                name,
            )
            for name in ("kubelet", "kube-proxy", "coredns")
        }
        self._start_containerd(deadline)
        self._import_images(deadline)
        self._write_cni_config()
        self._start_kubelet(kubeconfigs["kubelet"], pki, admin, deadline)
        self._start_kube_proxy(kubeconfigs["kube-proxy"], deadline)
        self._start_coredns(kubeconfigs["coredns"], admin, deadline)

    def _wait(self, what: str, check: object, deadline: float) -> None:
        def dead() -> str | None:
            for record in self.supervisor.records():
                if not record.alive():
                    return f"{record.name} exited (log {record.log})"
            return None

        try:
            wait_until(
                what,
                check,  # type: ignore[arg-type]
                max(deadline - time.monotonic(), 0.0),
                interval_s=0.5,
                ignore=(OSError, ApiError, RealNodeError, subprocess.TimeoutExpired),
                abort=dead,
            )
        except (TimeoutError, RuntimeError) as err:
            raise RealNodeError(str(err)) from None

    def _ctr(
        self, *args: str, timeout_s: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return _run(
            "ctr",
            f"--address={CONTAINERD_SOCKET}",
            "--namespace=k8s.io",
            *args,
            timeout_s=timeout_s,
            check=check,
        )

    def _start_containerd(self, deadline: float) -> None:
        root = containerd_root()
        root.mkdir(parents=True, exist_ok=True)
        CONTAINERD_STATE.mkdir(parents=True, exist_ok=True)
        pause = self.images["pause"].ref
        config = self.dir / "containerd.toml"
        config.write_text(
            f"""version = 2
root = "{root}"
state = "{CONTAINERD_STATE}"
# Keep containerd to what a CRI node needs; /opt/containerd stays untouched.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{CONTAINERD_SOCKET}"
[ttrpc]
  address = "{CONTAINERD_STATE}/containerd.sock.ttrpc"
[debug]
  address = "{CONTAINERD_STATE}/debug.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # The VM lacks CAP_SYS_RESOURCE: never lower an oom_score_adj below containerd's own.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{CONTAINERD_STATE}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.dir / "cni" / "net.d"}"
    max_conf_num = 1
"""
        )
        self.supervisor.start(
            "containerd", ["containerd", f"--config={config}", "--log-level=warn"], pass_fds=self._pass_fds()
        )
        self._wait("containerd", lambda: self._ctr("version", timeout_s=5).returncode == 0, deadline)

    def _pass_fds(self) -> tuple[int, ...]:
        """containerd inherits the host lock: it stays held while containerd runs, after we exit."""
        assert self.lock.fd is not None
        return (self.lock.fd,)

    def _import_images(self, deadline: float) -> None:
        """Stream each image's OCI layout into containerd unless it holds the ref already; blobs and
        snapshots it has (the big dependency layer, after a code-only change) are skipped."""
        present = set(self._ctr("images", "list", "--quiet").stdout.split())
        for name in ("pause", *self.wanted_images):
            image = self.images[name]
            if image.ref in present:
                continue
            started = time.monotonic()
            tar = subprocess.Popen(["tar", "-C", str(image.layout), "-cf", "-", "."], stdout=subprocess.PIPE)
            try:
                self._ctr_stdin(tar, "images", "import", "-")
            finally:
                tar.wait(timeout=60)
            print(f"real node: imported {image.ref} in {time.monotonic() - started:.0f}s", file=sys.stderr)
        present = set(self._ctr("images", "list", "--quiet").stdout.split())
        # Older builds of the same images (an earlier checkout's hash): their layers would pile up.
        wanted = {self.images[n].ref for n in ("pause", *self.wanted_images)}
        repos = {ref.rsplit(":", 1)[0] for ref in wanted}
        stale = [ref for ref in present if ref.rsplit(":", 1)[0] in repos and ref not in wanted]
        if stale:
            self._ctr("images", "remove", *stale, check=False)
        absent = [ref for ref in wanted if ref not in present]
        if absent:
            raise RealNodeError(f"containerd does not list {absent} after importing them")

    def _ctr_stdin(self, source: subprocess.Popen[bytes], *args: str) -> None:
        command = ["ctr", f"--address={CONTAINERD_SOCKET}", "--namespace=k8s.io", *args]
        done = subprocess.run(command, stdin=source.stdout, capture_output=True, timeout=1800, check=False)
        if done.returncode != 0:
            raise RealNodeError(f"{' '.join(command)} failed: {done.stderr.decode(errors='replace')[:2000]}")

    def _write_cni_config(self) -> None:
        net_d = self.dir / "cni" / "net.d"
        net_d.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": CNI_BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,  # nothing leaves the machine, so nothing is masqueraded
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.dir / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (net_d / "10-moeserve.conflist").write_text(json.dumps(conflist, indent=2) + "\n")

    def _start_kubelet(self, kubeconfig: Path, pki: Pki, admin: ApiClient, deadline: float) -> None:
        assert self.bin_dir is not None and pki.kubelet_serving is not None
        self.kubelet_port = _free_port(NODE_IP)
        healthz = _free_port()
        self.ports.update(kubelet=self.kubelet_port, kubelet_healthz=healthz)
        resolv = self.dir / "resolv.conf"
        resolv.write_text(f"nameserver {NODE_IP}\n")
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            "tlsCertFile": str(pki.kubelet_serving.cert),
            "tlsPrivateKeyFile": str(pki.kubelet_serving.key),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki.ca.cert)},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,  # this VM mounts cgroup v1 hierarchies
            "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
            "clusterDNS": [DNS_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(resolv),
            "failSwapOn": False,
            "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE: kubelet cannot lower its own score
            "podLogsDir": str(self.dir / "pod-logs"),
            "serializeImagePulls": False,
            # Images come from archives, not a registry: never garbage-collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "200Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "maxPods": 110,
            "registerNode": True,
            "staticPodPath": "",
            "shutdownGracePeriod": "0s",
            "protectKernelDefaults": False,
            "localStorageCapacityIsolation": True,
        }
        config_path = self.dir / "kubelet-config.json"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        labels = ",".join(f"{k}={v}" for k, v in NODE_LABELS.items())
        self.supervisor.start(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"),
                f"--config={config_path}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.dir / 'kubelet'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={labels}",
                "--v=1",
            ],
        )

        def ready() -> bool:
            node = admin.get(f"/api/v1/nodes/{NODE_NAME}")
            conditions = node.get("status", {}).get("conditions") or []
            is_ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
            taints = node.get("spec", {}).get("taints") or []
            return is_ready and not any(t.get("key") == "node.kubernetes.io/not-ready" for t in taints)

        self._wait(f"node {NODE_NAME} Ready and untainted (kubelet)", ready, deadline)

    def _start_kube_proxy(self, kubeconfig: Path, deadline: float) -> None:
        assert self.bin_dir is not None
        healthz, metrics = _free_port(), _free_port()
        self.ports.update(kube_proxy_healthz=healthz)
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "nftables",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": POD_CIDR,
            "detectLocalMode": "ClusterCIDR",
            "healthzBindAddress": f"127.0.0.1:{healthz}",
            "metricsBindAddress": f"127.0.0.1:{metrics}",
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # Pod -> Service -> pod on the same bridge: masquerade, so replies come back through the
            # host and are un-NATed whatever the bridge netfilter settings are.
            "nftables": {"masqueradeAll": True},
            # Leave the host's conntrack sysctls alone.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        }
        path = self.dir / "kube-proxy-config.json"
        path.write_text(json.dumps(config, indent=2) + "\n")
        self.supervisor.start("kube-proxy", [str(self.bin_dir / "kube-proxy"), f"--config={path}", "--v=1"])
        self._wait(
            "kube-proxy /healthz",
            lambda: _http_status(f"http://127.0.0.1:{healthz}/healthz") == 200,
            deadline,
        )

    def _start_coredns(self, kubeconfig: Path, admin: ApiClient, deadline: float) -> None:
        assert self.bin_dir is not None
        self._grant_coredns(admin)
        ready_port = _free_port()
        corefile = self.dir / "Corefile"
        corefile.write_text(
            f""".:53 {{
    bind {NODE_IP}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} coredns@moeserve-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
    loop
}}
"""
        )
        self.supervisor.start("coredns", [str(self.bin_dir / "coredns"), f"-conf={corefile}"])
        self._wait(
            "CoreDNS /ready", lambda: _http_status(f"http://127.0.0.1:{ready_port}/ready") == 200, deadline
        )

    def _grant_coredns(self, admin: ApiClient) -> None:
        """RBAC for CoreDNS's kubernetes plugin, and the kube-dns Service pointing at CoreDNS."""
        role: JsonObject = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "moeserve-test:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        }
        binding: JsonObject = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "moeserve-test:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "moeserve-test:coredns",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:coredns"}],
        }
        ports = [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ]
        service: JsonObject = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
            "spec": {"clusterIP": DNS_IP, "ports": [dict(p, targetPort=53) for p in ports]},
        }
        slice_: JsonObject = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns-coredns",
                "namespace": "kube-system",
                "labels": {
                    "kubernetes.io/service-name": "kube-dns",
                    "endpointslice.kubernetes.io/managed-by": "moeserve-test",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}, "nodeName": NODE_NAME}],
            "ports": ports,
        }
        for path, body in (
            ("/apis/rbac.authorization.k8s.io/v1/clusterroles", role),
            ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", binding),
            ("/api/v1/namespaces/kube-system/services", service),
            ("/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices", slice_),
        ):
            admin.create(path, body)


def stop_node(state_dir: Path, supervisor: Supervisor) -> list[str]:
    """Stop the node recorded in `state_dir` and restore the host; return what was left behind.

    Works from the files alone, so `python -m tests.controlplane down` can call it. Order: CoreDNS,
    kube-proxy and kubelet; then every container through containerd (killed, deleted with its
    snapshot); then containerd (and any shim it left); then the host state (host.py).
    """
    node_dir = state_dir / "node"
    snapshot_file = node_dir / "host-snapshot.json"
    if not snapshot_file.exists():
        return []
    problems: list[str] = []
    records = {r.name: r for r in supervisor.records()}
    for name in STOP_ORDER:
        if name in records:
            supervisor.stop_named(name)
    if "containerd" in records and records["containerd"].alive():
        problems += _remove_containers()
        supervisor.stop_named("containerd")
    problems += _kill_leftover_shims()
    snapshot = HostSnapshot.load(snapshot_file)
    problems += snapshot.restore([node_dir, CONTAINERD_STATE])
    shutil.rmtree(CONTAINERD_STATE, ignore_errors=True)
    snapshot_file.unlink()
    return problems


def clear_abandoned_node(previous_state_dir: Path | None) -> list[str]:
    """Stop and undo a node that a killed run left behind; return what was cleared (for the log).

    Call only while holding the host lock: then no node runs, so whatever of one is still here (the
    run's processes, its bridge, mounts, nft tables; a CI job killed at its time limit leaves them)
    was abandoned. First the normal stop from the abandoned state directory's records, which
    restores the host from that run's own snapshot; then, where those records are gone, the
    fixed-name pieces themselves: without this, the next `ip link add` fails with "File exists".
    """
    cleared: list[str] = []
    if previous_state_dir is not None and (previous_state_dir / "node" / "host-snapshot.json").exists():
        supervisor = Supervisor(
            previous_state_dir / "pids", previous_state_dir / "logs", die_with_parent=False
        )
        left = stop_node(previous_state_dir, supervisor)
        killed = supervisor.stop_all()
        cleared.append(f"stopped the node abandoned in {previous_state_dir}")
        cleared += [f"{previous_state_dir}: {p}" for p in left]
        cleared += [f"{previous_state_dir}: {name} needed SIGKILL" for name in killed]
    cleared += _kill_leftover_shims()
    if CONTAINERD_STATE.exists():
        for point in reversed(_mounts_under(CONTAINERD_STATE)):
            _run("umount", "-l", point, check=False)
        shutil.rmtree(CONTAINERD_STATE, ignore_errors=True)
        cleared.append(f"removed {CONTAINERD_STATE}")
    for link in (NODE_LINK, CNI_BRIDGE):
        if Path(f"/sys/class/net/{link}").exists():
            _run("ip", "link", "delete", link, check=False)
            cleared.append(f"deleted link {link}")
    return cleared


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p.startswith(prefix) or p == str(root)]


def _remove_containers() -> list[str]:
    def ctr(*args: str) -> subprocess.CompletedProcess[str]:
        return _run(
            "ctr", f"--address={CONTAINERD_SOCKET}", "--namespace=k8s.io", *args, timeout_s=60, check=False
        )

    tasks = ctr("tasks", "list", "--quiet").stdout.split()
    for task in tasks:
        ctr("tasks", "kill", "--signal=SIGKILL", task)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listing = ctr("tasks", "list").stdout.splitlines()[1:]
        if all(line.split()[-1] != "RUNNING" for line in listing if line.split()):
            break
        time.sleep(0.2)
    for task in tasks:
        ctr("tasks", "delete", "--force", task)
    problems = []
    for container in ctr("containers", "list", "--quiet").stdout.split():
        done = ctr("containers", "delete", container)
        if done.returncode != 0:
            problems.append(f"ctr containers delete {container}: {done.stderr.strip()}")
    return problems


def _kill_leftover_shims() -> list[str]:
    """containerd-shim-runc-v2 processes of our containerd (they run detached from it)."""
    problems = []
    marker = str(CONTAINERD_SOCKET).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and marker in argv:
            pid = int(cmdline.parent.name)
            start = proc_start_time(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 5
            while proc_start_time(pid) == start and start is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            problems.append(f"killed a leftover containerd shim (pid {pid})")
    return problems
