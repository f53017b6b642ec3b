"""The real node runs real containers: sandboxes from the local pause image, a plain Debian image,
pod-to-pod traffic, ClusterIP Services (kube-proxy, nftables), cluster DNS (CoreDNS), the in-cluster
`kubernetes` Service, and the apiserver's logs/exec through the kubelet.

Each pod answers with its own name, so a reply proves which pod served it.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
from kubernetes import client

from tests.controlplane import ControlPlane
from tests.controlplane.node import DNS_IP, NODE_IP, NODE_NAME, POD_CIDR
from tests.controlplane.waiting import wait_until
from tests.e2e.support import Kubectl

# Generous: the first test also waits for the session's cluster (an image import the first time).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

POD_READY_TIMEOUT_S = 180.0
"""From create to Ready on a busy 2-core machine (the images are local: no pulls)."""

# A tiny HTTP server in the base image's python3: answers GET / with the pod's name, and is the
# target of the readiness probe.
SERVER = (
    "import http.server, os\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = os.environ['POD_NAME'].encode()\n"
    "        self.send_response(200)\n"
    "        self.send_header('Content-Length', str(len(body)))\n"
    "        self.end_headers()\n"
    "        self.wfile.write(body)\n"
    "http.server.ThreadingHTTPServer(('', 8080), H).serve_forever()\n"
)


def _pod(name: str, image: str, command: list[str], labels: dict[str, str], probe: bool) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "command": command,
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
    }
    if probe:
        container["readinessProbe"] = {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [container], "terminationGracePeriodSeconds": 1},
    }


def _wait_ready(core: Any, namespace: str, names: list[str]) -> dict[str, Any]:
    def ready() -> dict[str, Any]:
        """The pods once all are Ready, else {} (not yet)."""
        pods = {n: core.read_namespaced_pod(n, namespace) for n in names}
        for pod in pods.values():
            conditions = pod.status.conditions or []
            if not any(c.type == "Ready" and c.status == "True" for c in conditions):
                return {}
        return pods

    return wait_until(
        f"pods {names} Ready", ready, POD_READY_TIMEOUT_S, interval_s=1.0, ignore=(client.ApiException,)
    )


def _exec_python(kubectl: Kubectl, namespace: str, pod: str, code: str) -> str:
    return kubectl("exec", "-n", namespace, pod, "--", "python3", "-c", code).stdout.strip()


def _get(url: str) -> str:
    return f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"


def test_node_is_real(
    e2e_cluster: ControlPlane, e2e_client: client.ApiClient, images: dict[str, str]
) -> None:
    node: Any = client.CoreV1Api(e2e_client).read_node(NODE_NAME)
    info = node.status.node_info
    assert info.kubelet_version == "v1.37.2"
    assert info.kube_proxy_version in ("", "v1.37.2")  # deprecated field, may be empty
    assert info.container_runtime_version.startswith("containerd://1.6")
    addresses = {a.type: a.address for a in node.status.addresses}
    assert addresses["InternalIP"] == NODE_IP
    node_images = {name for image in node.status.images or [] for name in image.names or []}
    assert (
        images["pause"] in node_images and images["base"] in node_images and images["moeserve"] in node_images
    )
    # The in-cluster `kubernetes` Service points at the apiserver on the node's address.
    endpoints: Any = client.CoreV1Api(e2e_client).read_namespaced_endpoints("kubernetes", "default")
    assert [a.ip for subset in endpoints.subsets for a in subset.addresses] == [NODE_IP]


def test_pods_services_dns_logs_exec(
    e2e_client: client.ApiClient, kubectl: Kubectl, namespace: str, images: dict[str, str]
) -> None:
    core: Any = client.CoreV1Api(e2e_client)  # models type every field Optional
    base = images["base"]
    for name in ("server-a", "server-b"):
        core.create_namespaced_pod(
            namespace, _pod(name, base, ["python3", "-c", SERVER], {"app": "server"}, probe=True)
        )
    core.create_namespaced_pod(
        namespace, _pod("client", base, ["sleep", "infinity"], {"app": "client"}, False)
    )
    core.create_namespaced_service(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "server"},
            "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )
    pods = _wait_ready(core, namespace, ["server-a", "server-b", "client"])
    for pod in pods.values():
        assert pod.spec.node_name == NODE_NAME
        assert pod.status.pod_ip.startswith(POD_CIDR.rsplit(".", 2)[0] + ".")

    # Pod to pod, by pod IP.
    ip_a = pods["server-a"].status.pod_ip
    assert _exec_python(kubectl, namespace, "client", _get(f"http://{ip_a}:8080/")) == "server-a"

    # Pod to Service, by its DNS name (CoreDNS) and ClusterIP (kube-proxy): both backends answer.
    service = core.read_namespaced_service("server", namespace)
    cluster_ip = service.spec.cluster_ip
    resolved = _exec_python(
        kubectl,
        namespace,
        "client",
        f"import socket; print(socket.gethostbyname('server.{namespace}.svc.cluster.local'))",
    )
    assert resolved == cluster_ip
    resolv = kubectl("exec", "-n", namespace, "client", "--", "cat", "/etc/resolv.conf").stdout
    assert f"nameserver {DNS_IP}" in resolv
    seen: set[str] = set()

    def both_backends() -> bool:
        code = (
            "import urllib.request\n"
            "for _ in range(20):\n"
            f"    print(urllib.request.urlopen('http://server.{namespace}/', timeout=10).read().decode())\n"
        )
        seen.update(_exec_python(kubectl, namespace, "client", code).split())
        return seen == {"server-a", "server-b"}

    wait_until("both server pods answering through the Service", both_backends, 120.0, interval_s=1.0)

    # From the node itself, through the ClusterIP.
    with urllib.request.urlopen(f"http://{cluster_ip}/", timeout=10) as resp:
        assert resp.read().decode() in ("server-a", "server-b")

    # The apiserver from inside a pod: the `kubernetes` Service, with the pod's ServiceAccount.
    code = (
        "import json, ssl, urllib.request\n"
        "d = '/var/run/secrets/kubernetes.io/serviceaccount/'\n"
        "ctx = ssl.create_default_context(cafile=d + 'ca.crt')\n"
        "req = urllib.request.Request('https://kubernetes.default.svc/version',"
        " headers={'Authorization': 'Bearer ' + open(d + 'token').read()})\n"
        "print(urllib.request.urlopen(req, context=ctx, timeout=10).read().decode())\n"
    )
    version = json.loads(_exec_python(kubectl, namespace, "client", code))
    assert version["gitVersion"] == "v1.37.2"

    # Logs through the kubelet: the server logged the requests it answered.
    logs = kubectl("logs", "-n", namespace, "server-a").stdout
    assert '"GET / HTTP/1.1" 200' in logs
