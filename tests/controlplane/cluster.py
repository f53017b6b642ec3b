"""A real Kubernetes control plane on 127.0.0.1 for tests: etcd, kube-apiserver (TLS, Node+RBAC),
kube-controller-manager, kube-scheduler, and kwok faking GPU nodes whose pods report Running.

`ControlPlane` starts the components from binaries built by `tests/controlplane/build.sh`, registers
the fake nodes, waits until all of it is ready, and stops it again. Everything lives in one state
directory: key material, etcd data, kubeconfigs, one log per component and pid files (see
`processes.py`), so `python -m tests.controlplane down` can stop what `up` started.

Without `real_node`, no container ever runs: kwok only writes pod and node status. With
`real_node=True` the cluster also gets one real node (kubelet, containerd, CNI, kube-proxy, CoreDNS;
see node.py) and the apiserver listens on that node's address, so pods reach it through the
`kubernetes` Service. It builds nothing either: missing binaries raise `MissingBinariesError` naming
them and the build command.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .api import ApiClient, ApiError, Credentials, JsonObject, write_kubeconfig
from .node import NODE_IP, NODE_NAME, RealNode, RealNodeError, stop_node
from .pki import CertPair, Pki, create_pki
from .processes import PidRecord, Supervisor
from .waiting import wait_until

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
BUILD_COMMAND = "bash tests/controlplane/build.sh"
REQUIRED_FILES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "helm",
    "kwok-stages.yaml",
)

# Labels and annotations on the fake nodes.
ZONE_LABEL = "topology.kubernetes.io/zone"
RACK_LABEL = "moeserve.io/rack"
GPU_RESOURCE = "nvidia.com/gpu"
KWOK_ANNOTATION = ("kwok.x-k8s.io/node", "fake")

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTROLLERS = (
    "garbage-collector-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "job-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "namespace-controller",
    "endpointslice-controller",
    # Lift the not-ready taint that admission puts on new nodes, taint nodes whose kwok heartbeat
    # stops, evict their pods, and delete pods of deleted nodes: what losing a node looks like.
    "node-lifecycle-controller",
    "taint-eviction-controller",
    "pod-garbage-collector-controller",
)
# What a real node's pods need besides: PersistentVolumeClaims bound to (hostPath) volumes, and the
# legacy Endpoints some clients still read.
REAL_NODE_CONTROLLERS = (
    "persistentvolume-binder-controller",
    "persistentvolume-protection-controller",
    "persistentvolumeclaim-protection-controller",
    "endpoints-controller",
)


class MissingBinariesError(RuntimeError):
    """The control-plane binaries are not built (or MOESERVE_CONTROLPLANE_BIN lacks some)."""


class StartError(RuntimeError):
    """A component did not become ready; the message names it and quotes its log."""


@dataclass(frozen=True)
class FakeNode:
    """A kwok-managed node: what the scheduler sees, nothing runs on it."""

    name: str
    zone: str
    rack: str
    gpus: int = 8
    cpu: str = "64"
    memory: str = "512Gi"
    pods: str = "110"
    internal_ip: str = "10.240.0.1"
    """Reported as the node's InternalIP; nothing listens there."""

    def manifest(self) -> JsonObject:
        resources = {"cpu": self.cpu, "memory": self.memory, "pods": self.pods, GPU_RESOURCE: str(self.gpus)}
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "annotations": {KWOK_ANNOTATION[0]: KWOK_ANNOTATION[1], "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    ZONE_LABEL: self.zone,
                    RACK_LABEL: self.rack,
                    "nvidia.com/gpu.present": "true",
                },
            },
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "addresses": [{"type": "InternalIP", "address": self.internal_ip}],
            },
        }


DEFAULT_NODES = (
    FakeNode("gpu-node-0", zone="zone-a", rack="rack-0", internal_ip="10.240.0.10"),
    FakeNode("gpu-node-1", zone="zone-a", rack="rack-1", internal_ip="10.240.0.11"),
    FakeNode("gpu-node-2", zone="zone-b", rack="rack-2", internal_ip="10.240.0.12"),
    FakeNode("gpu-node-3", zone="zone-b", rack="rack-3", internal_ip="10.240.0.13"),
)


@dataclass(frozen=True)
class Ports:
    """Loopback ports, chosen free at start."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int

    @classmethod
    def pick(cls) -> Ports:
        sockets = [socket.socket() for _ in range(6)]
        try:
            for s in sockets:
                s.bind(("127.0.0.1", 0))
            return cls(*(s.getsockname()[1] for s in sockets))
        finally:
            for s in sockets:
                s.close()


def locate_binaries() -> Path:
    """The directory holding the control-plane binaries; raise if any is missing."""
    override = os.environ.get("MOESERVE_CONTROLPLANE_BIN")
    if override:
        bin_dir, origin = Path(override), "MOESERVE_CONTROLPLANE_BIN"
    else:
        out = subprocess.run(
            ["bash", str(BUILD_SCRIPT), "--print-bin-dir"], capture_output=True, text=True, check=True
        )
        bin_dir, origin = Path(out.stdout.strip()), "the build cache"
    missing = [name for name in REQUIRED_FILES if not (bin_dir / name).is_file()]
    if missing:
        raise MissingBinariesError(
            f"control-plane binaries missing from {origin} ({bin_dir}): {', '.join(missing)}. "
            f"Build them once with `{BUILD_COMMAND}` (about 6 minutes on 2 cores, then cached), "
            "or point MOESERVE_CONTROLPLANE_BIN at a directory built by it."
        )
    return bin_dir


def _wait_for(what: str, check: Callable[[], bool], deadline: float, alive: Callable[[], str | None]) -> None:
    """Poll `check` until `deadline`; fail early when `alive` names a component that exited."""
    try:
        wait_until(
            what, check, max(deadline - time.monotonic(), 0.0), ignore=(OSError, ApiError), abort=alive
        )
    except (TimeoutError, RuntimeError) as err:
        raise StartError(str(err)) from None


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, context=context, timeout=5) as resp:
        return resp.status == 200


def _insecure_tls() -> ssl.SSLContext:
    """For /healthz of the controller-manager and scheduler, which serve self-signed certificates."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _node_schedulable(node: JsonObject) -> bool:
    """Ready, and the node-lifecycle controller has lifted the not-ready taint."""
    conditions = node.get("status", {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    taints = node.get("spec", {}).get("taints") or []
    return ready and not any(t.get("key") == "node.kubernetes.io/not-ready" for t in taints)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ControlPlane:
    """One control plane, rooted at `state_dir`. Use `start()`/`stop()` or as a context manager."""

    def __init__(
        self,
        state_dir: Path,
        bin_dir: Path | None = None,
        nodes: tuple[FakeNode, ...] = DEFAULT_NODES,
        die_with_parent: bool = True,
        real_node: bool = False,
        node_images: tuple[str, ...] = ("base",),
        node_lock_timeout_s: float = 1800.0,
    ) -> None:
        """`nodes` are kwok's fake nodes (none: kwok does not run). With `real_node`, one real node
        runs too, with the images `node_images` (names from images.sh: base, moeserve) imported; it
        waits up to `node_lock_timeout_s` for another real node on this host to go away."""
        self.state_dir = state_dir.resolve()
        self.bin_dir = bin_dir
        self.nodes = nodes
        self.supervisor = Supervisor(self.state_dir / "pids", self.state_dir / "logs", die_with_parent)
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.ports: Ports | None = None
        self.pki: Pki | None = None
        self.real_node = RealNode(self.state_dir, self.supervisor, node_images) if real_node else None
        self.node_lock_timeout_s = node_lock_timeout_s
        self.node_leftovers: list[str] = []
        """What stopping the real node could not restore on the host (empty: all of it)."""

    # -- public surface ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """Where the apiserver listens: loopback, or the real node's address (reachable from pods)."""
        return NODE_IP if self.real_node else "127.0.0.1"

    @property
    def server(self) -> str:
        assert self.ports, "not started"
        return f"https://{self.host}:{self.ports.apiserver}"

    @property
    def log_dir(self) -> Path:
        return self.supervisor.log_dir

    def start(self, timeout_s: float = 180.0) -> ControlPlane:
        """Start every component and return once the API is ready and every fake node is Ready.

        On failure everything started so far is stopped again; logs stay in `log_dir`.
        """
        bin_dir = self.bin_dir or locate_binaries()
        self.bin_dir = bin_dir
        deadline = time.monotonic() + timeout_s
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ports = Ports.pick()
        self.pki = create_pki(
            self.state_dir / "pki", SERVICE_IP, (NODE_NAME, NODE_IP) if self.real_node else None
        )
        kubeconfigs = self._write_kubeconfigs(self.pki)
        try:
            if self.real_node:
                # Before anything listens on NODE_IP: the host lock, the host snapshot, the address.
                self.real_node.prepare(self.node_lock_timeout_s)
                deadline = max(deadline, time.monotonic() + timeout_s)  # the lock wait does not count
            self._start_etcd(bin_dir, deadline)
            self._start_apiserver(bin_dir, deadline)
            self._start_controllers(bin_dir, kubeconfigs, deadline)
            if self.nodes:
                self._register_nodes(bin_dir, kubeconfigs["kwok"], deadline)
            if self.real_node:
                # Importing a multi-GB image the first time takes minutes; it does not count either.
                self.real_node.start(self.server, self.pki, self.admin(), deadline + 1800.0)
        except BaseException as err:
            # Leave nothing running behind a failed start, whatever failed.
            diagnostics = self._diagnostics()
            self.stop()
            if isinstance(err, (StartError, RealNodeError)):
                raise StartError(f"{err}\n{diagnostics}") from None
            raise
        self._write_state()
        return self

    def stop(self) -> list[str]:
        """Stop all components (newest first; a real node first, restoring the host); return those
        that ignored SIGTERM and whatever the real node's cleanup left behind."""
        if self.real_node:
            self.node_leftovers = stop_node(self.state_dir, self.supervisor)
            self.real_node.lock.release()
        return self.node_leftovers + self.supervisor.stop_all()

    def admin(self) -> ApiClient:
        assert self.pki
        return ApiClient(self.server, self.pki.ca.cert, Credentials(self.pki.admin.cert, self.pki.admin.key))

    def service_account_kubeconfig(self, namespace: str, name: str, expiration_s: int = 3600) -> Path:
        """A kubeconfig for ServiceAccount `namespace/name`, with a token from the TokenRequest API."""
        assert self.pki
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": expiration_s},
        }
        answer = self.admin().create(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", request)
        path = self.state_dir / f"kubeconfig-sa-{namespace}-{name}"
        user = f"system:serviceaccount:{namespace}:{name}"
        return write_kubeconfig(
            path, self.server, self.pki.ca.cert, Credentials(token=answer["status"]["token"]), user
        )

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- components ----------------------------------------------------------------------------

    def _write_kubeconfigs(self, pki: Pki) -> dict[str, Path]:
        write_kubeconfig(
            self.kubeconfig, self.server, pki.ca.cert, Credentials(pki.admin.cert, pki.admin.key), "admin"
        )
        paths = {}
        for component in ("controller-manager", "scheduler", "kwok"):
            pair: CertPair = pki.clients[component]
            path = self.state_dir / f"kubeconfig-{component}"
            paths[component] = write_kubeconfig(
                path, self.server, pki.ca.cert, Credentials(pair.cert, pair.key), component
            )
        return paths

    def _start(self, name: str, argv: list[str]) -> PidRecord:
        return self.supervisor.start(name, argv)

    def _dead_component(self) -> str | None:
        for record in self.supervisor.records():
            if not record.alive():
                return f"{record.name} exited"
        return None

    def _start_etcd(self, bin_dir: Path, deadline: float) -> None:
        assert self.ports
        client = f"http://127.0.0.1:{self.ports.etcd_client}"
        peer = f"http://127.0.0.1:{self.ports.etcd_peer}"
        self._start(
            "etcd",
            [
                str(bin_dir / "etcd"),
                "--name=moeserve-test",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=moeserve-test={peer}",
                "--unsafe-no-fsync",  # test data only; spares the 2-core machine's disk
                "--log-level=warn",
            ],
        )
        _wait_for("etcd /health", lambda: _http_ok(f"{client}/health"), deadline, self._dead_component)

    def _start_apiserver(self, bin_dir: Path, deadline: float) -> None:
        assert self.ports and self.pki
        pki = self.pki
        if self.real_node:
            # The `kubernetes` Service's endpoint is NODE_IP, reconciled (a lease) like a real
            # control plane's; the apiserver reaches the kubelet by its InternalIP.
            node_flags = [
                "--endpoint-reconciler-type=lease",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--kubelet-client-certificate={pki.clients['apiserver-kubelet-client'].cert}",
                f"--kubelet-client-key={pki.clients['apiserver-kubelet-client'].key}",
                f"--kubelet-certificate-authority={pki.ca.cert}",
            ]
        else:
            # The `kubernetes` Endpoints may not point at loopback; nothing in-cluster dials it anyway.
            node_flags = ["--endpoint-reconciler-type=none"]
        self._start(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--bind-address={self.host}",
                f"--advertise-address={self.host}",
                f"--secure-port={self.ports.apiserver}",
                f"--etcd-servers=http://127.0.0.1:{self.ports.etcd_client}",
                f"--tls-cert-file={pki.apiserver.cert}",
                f"--tls-private-key-file={pki.apiserver.key}",
                f"--client-ca-file={pki.ca.cert}",
                f"--cert-dir={self.state_dir / 'apiserver-certs'}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.service_account_pub}",
                f"--service-account-signing-key-file={pki.service_account_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                *node_flags,
                "--profiling=false",
            ],
        )
        admin = self.admin()
        _wait_for(
            "kube-apiserver /readyz", lambda: admin.get("/readyz") == "ok", deadline, self._dead_component
        )

    def _start_controllers(self, bin_dir: Path, kubeconfigs: dict[str, Path], deadline: float) -> None:
        assert self.ports and self.pki
        kcm, sched = kubeconfigs["controller-manager"], kubeconfigs["scheduler"]
        self._start(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kcm}",
                f"--authentication-kubeconfig={kcm}",
                f"--authorization-kubeconfig={kcm}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports.controller_manager}",
                f"--cert-dir={self.state_dir / 'controller-manager-certs'}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.pki.service_account_key}",
                f"--root-ca-file={self.pki.ca.cert}",
                f"--controllers={','.join(CONTROLLERS + (REAL_NODE_CONTROLLERS if self.real_node else ()))}",
            ],
        )
        self._start(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                f"--kubeconfig={sched}",
                f"--authentication-kubeconfig={sched}",
                f"--authorization-kubeconfig={sched}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports.scheduler}",
                f"--cert-dir={self.state_dir / 'scheduler-certs'}",
                "--leader-elect=false",
            ],
        )
        tls = _insecure_tls()
        for name, port in (
            ("kube-controller-manager", self.ports.controller_manager),
            ("kube-scheduler", self.ports.scheduler),
        ):
            url = f"https://127.0.0.1:{port}/healthz"
            _wait_for(
                f"{name} /healthz", functools.partial(_http_ok, url, tls), deadline, self._dead_component
            )
        admin = self.admin()
        _wait_for(
            "the default ServiceAccount (serviceaccount controller)",
            lambda: bool(admin.get("/api/v1/namespaces/default/serviceaccounts/default")),
            deadline,
            self._dead_component,
        )

    def _register_nodes(self, bin_dir: Path, kubeconfig: Path, deadline: float) -> None:
        assert self.ports
        self._start(
            "kwok",
            [
                str(bin_dir / "kwok"),
                f"--kubeconfig={kubeconfig}",
                f"--config={bin_dir / 'kwok-stages.yaml'}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION[0]}={KWOK_ANNOTATION[1]}",
                f"--server-address=127.0.0.1:{self.ports.kwok}",
                "--cidr=10.244.0.1/16",
                "--node-ip=10.240.0.1",
                "--node-lease-duration-seconds=40",
            ],
        )
        admin = self.admin()
        for node in self.nodes:
            admin.create("/api/v1/nodes", node.manifest())

        def all_ready() -> bool:
            items = admin.get("/api/v1/nodes")["items"]
            ready = {n["metadata"]["name"] for n in items if _node_schedulable(n)}
            return all(node.name in ready for node in self.nodes)

        _wait_for(
            f"{len(self.nodes)} fake nodes Ready and untainted (kwok, node-lifecycle controller)",
            all_ready,
            deadline,
            self._dead_component,
        )

    # -- state and diagnostics -----------------------------------------------------------------

    def _write_state(self) -> None:
        assert self.ports
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "bin_dir": str(self.bin_dir),
            "ports": asdict(self.ports),
            "nodes": [node.name for node in self.nodes] + ([NODE_NAME] if self.real_node else []),
            "real_node": bool(self.real_node),
        }
        if self.real_node:
            state["node_ports"] = self.real_node.ports
            state["images"] = {name: image.ref for name, image in self.real_node.images.items()}
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=2) + "\n")

    def _diagnostics(self) -> str:
        parts = [f"logs in {self.log_dir}"]
        for record in self.supervisor.records():
            status = "running" if record.alive() else "EXITED"
            parts.append(
                f"--- {record.name} ({status}), last lines of {record.log}:\n{tail(Path(record.log), 15)}"
            )
        return "\n".join(parts)


def remove_state(state_dir: Path) -> None:
    """Delete a state directory once nothing in it runs any more."""
    shutil.rmtree(state_dir, ignore_errors=True)
