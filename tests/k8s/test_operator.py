"""The operator and its Helm chart on a real control plane with fake GPU nodes (kwok).

The chart is `helm install`ed; the operator runs as a local process (`moeserve-operator`) with the
token of the chart's ServiceAccount, so every test also proves the chart's RBAC is enough. Nothing
runs inside the kwok pods, so no Ray dashboard ever answers: a MoEService gets all its objects and
Running pods, and then says that the Serve application waits for the Ray dashboard.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from moeserve import contract
from moeserve.serve_config import ServeAppConfig
from tests.controlplane import DEFAULT_NODES, GPU_RESOURCE, ZONE_LABEL, ControlPlane
from tests.controlplane.waiting import wait_until
from tests.k8s.operator_support import (
    GROUP,
    PLURAL,
    RELEASE,
    Cluster,
    Installed,
    Json,
    Kubectl,
    Operator,
    apply,
    condition,
    helm,
    install_chart,
    running,
    uids,
    uninstall_chart,
    wait_running,
)
from tests.moeservices import CHART, example, moeservice

pytestmark = pytest.mark.k8s


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(k8s_client: client.ApiClient) -> Cluster:
    return Cluster(k8s_client)


@pytest.fixture(scope="module")
def core(k8s_client: client.ApiClient) -> Any:
    return client.CoreV1Api(k8s_client)


@pytest.fixture(scope="module")
def installed(k8s_cluster: ControlPlane, core: Any) -> Iterator[Installed]:
    release = install_chart(k8s_cluster, core)
    yield release
    uninstall_chart(k8s_cluster, core, release)


@pytest.fixture(scope="module")
def operator(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    process = Operator(tmp_path_factory.mktemp("operator"), installed.kubeconfig, installed.namespace).start()
    yield process
    process.stop()
    lines = process.log().splitlines()
    bad = [i for i, line in enumerate(lines) if "forbidden" in line.lower() or "Traceback" in line]
    if bad:
        context = "\n".join(lines[max(bad[0] - 5, 0) : bad[0] + 40])
        pytest.fail(f"the operator logged an RBAC failure or a crash:\n{context}", pytrace=False)


@pytest.fixture
def ns(installed: Installed, operator: Operator) -> str:
    return installed.namespace


# -- the chart -----------------------------------------------------------------------------------


def test_helm_lint_is_clean_and_both_rbac_modes_render(k8s_cluster: ControlPlane) -> None:
    lint = helm(k8s_cluster.kubeconfig, "lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in lint.stdout

    def render(*values: str) -> list[Json]:
        out = helm(
            k8s_cluster.kubeconfig, "template", "r", str(CHART), "-n", "ops", "--kube-version=1.37.2", *values
        )
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    def args(docs: list[Json]) -> list[str]:
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        assert deployment["spec"]["strategy"] == {"type": "Recreate"} and deployment["spec"]["replicas"] == 1
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["moeserve-operator"]
        result: list[str] = container["args"]
        return result

    cluster_wide = render("--set=clusterWide=true")
    assert sorted(d["kind"] for d in cluster_wide if "Role" in d["kind"]) == [
        "ClusterRole",
        "ClusterRoleBinding",
    ]
    assert "--all-namespaces" in args(cluster_wide)
    namespaced = render("--set=watchNamespaces={team-a,team-b}", "--set=nodeSelector.pool=system")
    roles = sorted((d["kind"], d["metadata"]["namespace"]) for d in namespaced if "Role" in d["kind"])
    assert roles == [
        ("Role", "team-a"),
        ("Role", "team-b"),
        ("RoleBinding", "team-a"),
        ("RoleBinding", "team-b"),
    ]
    assert {"--namespace=team-a", "--namespace=team-b"} <= set(args(namespaced))
    (deployment,) = [d for d in namespaced if d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "system"}


def test_the_chart_runs_a_locally_imported_image_with_kopfs_health_probes(k8s_cluster: ControlPlane) -> None:
    def render(*values: str, check: bool = True) -> Any:
        return helm(
            k8s_cluster.kubeconfig,
            "template",
            "r",
            str(CHART),
            "-n",
            "ops",
            "--kube-version=1.37.2",
            *values,
            check=check,
        )

    out = render("--set=image.repository=moeserve", "--set=image.tag=dev", "--set=image.pullPolicy=Never")
    (deployment,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert (container["image"], container["imagePullPolicy"]) == ("moeserve:dev", "Never")
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert "--model-retry-interval=60" in container["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    assert (
        pod["securityContext"]["runAsNonRoot"] is True and pod["serviceAccountName"] == "r-moeserve-operator"
    )
    bad = render("--set=image.pullPolicy=Sometimes", check=False)
    assert bad.returncode != 0 and "pullPolicy" in bad.stderr, bad.stderr
    old = render("--kube-version=1.32.0", check=False)
    assert old.returncode != 0 and "kubeVersion" in old.stderr, old.stderr


def test_chart_installs_the_crd_and_an_operator_with_least_privilege(
    installed: Installed, kubectl: Kubectl, k8s_client: client.ApiClient
) -> None:
    crd = json.loads(kubectl("get", "crd", f"{PLURAL}.{GROUP}", "-o", "json").stdout)
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    apps: Any = client.AppsV1Api(k8s_client)
    deployment = apps.read_namespaced_deployment(f"{RELEASE}-moeserve-operator", installed.namespace)
    assert deployment.spec.strategy.type == "Recreate"
    assert f"--namespace={installed.namespace}" in deployment.spec.template.spec.containers[0].args
    sa = installed.kubeconfig

    def can(*args: str) -> bool:
        return str(kubectl("auth", "can-i", *args, kubeconfig=sa, check=False).stdout).strip() == "yes"

    ns = f"--namespace={installed.namespace}"
    for allowed in (
        ("create", "pods"),
        ("delete", "pods"),
        ("patch", "pods"),  # the group-size annotation and the head's serve label
        ("watch", "pods"),
        ("patch", "moeservices.moeserve.io/status"),
        ("create", "events"),
        ("create", "secrets"),  # each MoEService's Ray auth token: created once, then read
        ("get", "secrets"),
    ):
        assert can(*allowed, ns), allowed
    for denied in (
        ("patch", "secrets", ns),
        ("delete", "secrets", ns),
        ("get", "secrets", "--namespace=default"),
        ("create", "deployments", ns),
        ("update", "moeservices.moeserve.io", ns),
        ("create", "pods", "--namespace=default"),
        ("list", "namespaces"),
        ("list", "customresourcedefinitions"),
    ):
        assert not can(*denied), denied


# -- validation by the API server -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, spec, message",
    [
        (
            "demo",
            {"attention": {"ranks": 0}},
            "spec.attention.ranks in body should be greater than or equal to 1",
        ),
        ("demo", {"replicas": -1}, "spec.replicas in body should be greater than or equal to 0"),
        (
            "demo",
            {"experts": {"ranks": 0}},
            "spec.experts.ranks in body should be greater than or equal to 1",
        ),
        (
            "demo",
            {"experts": {"gpusPerRank": -1}},
            "spec.experts.gpusPerRank in body should be greater than or equal to 0",
        ),
        (
            "demo",
            {"serving": {"grpcPort": 70000}},
            "spec.serving.grpcPort in body should be less than or equal to 65535",
        ),
        (
            "demo",
            {"serving": {"grpcPort": 8080, "metricsPort": 8080}},
            "serving.grpcPort and serving.metricsPort must differ",
        ),
        ("demo", {"serving": {"grpcPort": 8265}}, "serving.grpcPort must not be a Ray head port"),
        ("demo", {"serving": {"metricsPort": 6379}}, "serving.metricsPort must not be a Ray head port"),
        (
            "demo",
            {"experts": {"ranks": 2, "placement": [[0, 1]]}},
            "experts.placement must have one entry per expert rank",
        ),
        (
            "demo",
            {"experts": {"placement": [[0, 0], [1]]}},
            "spec.experts.placement[0][1]: Duplicate value: 0",
        ),
        ("demo", {"model": {"dtype": "int8"}}, 'spec.model.dtype: Unsupported value: "int8"'),
        ("demo", {"model": {"fp8Weights": "int4"}}, 'spec.model.fp8Weights: Unsupported value: "int4"'),
        (
            "demo",
            {"experts": {"redundant": -1}},
            "spec.experts.redundant in body should be greater than or equal to 0",
        ),
        (
            "demo",
            {"experts": {"rebalanceInterval": -1}},
            "spec.experts.rebalanceInterval in body should be greater than or equal to 0",
        ),
        (
            "demo",
            {"experts": {"rebalanceMinGain": 1}},
            "spec.experts.rebalanceMinGain in body should be less than 1",
        ),
        (
            "demo",
            {"experts": {"rebalanceMinGain": -0.5}},
            "spec.experts.rebalanceMinGain in body should be greater than or equal to 0",
        ),
        ("demo", {"image": None}, "spec.image: Required value"),
        (
            "demo",
            {"attention": {"resources": {"limits": {GPU_RESOURCE: 1}}}},
            "set GPUs with gpusPerRank, not in resources",
        ),
        (
            "demo",
            {"serving": {"engine": {"kvCacheTokens": 8, "blockSize": 16}}},
            "kvCacheTokens must hold at least one block",
        ),
        ("demo", {"scheduling": {"packing": "Fill"}}, 'spec.scheduling.packing: Unsupported value: "Fill"'),
        (
            "demo",
            {"attention": {"gpusPerRank": 0}, "experts": {"gpusPerRank": 1}},
            "attention.gpusPerRank and experts.gpusPerRank must both be 0 (CPU, gloo) or both be at least 1",
        ),
        (
            "demo",
            {"model": {"volume": {}}},
            "model.volume must set exactly one of persistentVolumeClaim, hostPath, image, nfs, csi",
        ),
        (
            "demo",
            {"model": {"volume": {"hostPath": {"path": "/m"}, "persistentVolumeClaim": {"claimName": "m"}}}},
            "model.volume must set exactly one of persistentVolumeClaim, hostPath, image, nfs, csi",
        ),
        (
            "demo",
            {"model": {"volume": {"persistentVolumeClaim": {}}}},
            "spec.model.volume.persistentVolumeClaim.claimName: Required value",
        ),
        (
            "demo",
            {"model": {"path": "models/tiny", "volume": {"persistentVolumeClaim": {"claimName": "m"}}}},
            "model.path must be an absolute directory other than / when model.volume is set",
        ),
        (
            "demo",
            {"model": {"path": "/", "volume": {"persistentVolumeClaim": {"claimName": "m"}}}},
            "model.path must be an absolute directory other than / when model.volume is set",
        ),
        ("demo", {"model": {"subPath": "tiny"}}, "model.subPath selects a directory of model.volume"),
        (
            "demo",
            {"model": {"subPath": "../etc", "volume": {"persistentVolumeClaim": {"claimName": "m"}}}},
            "model.subPath must be a relative path without '..'",
        ),
        (
            "demo",
            {"model": {"volume": {"hostPath": {"path": "/m", "type": "Socket"}}}},
            'spec.model.volume.hostPath.type: Unsupported value: "Socket"',
        ),
        (
            "demo",
            {"model": {"volume": {"image": {"reference": "r/m:1", "pullPolicy": "Sometimes"}}}},
            'spec.model.volume.image.pullPolicy: Unsupported value: "Sometimes"',
        ),
        (
            "demo",
            {"probes": {"startupSeconds": 1}},
            "spec.probes.startupSeconds in body should be greater than or equal to 10",
        ),
        ("demo", {"imagePullPolicy": "Sometimes"}, 'spec.imagePullPolicy: Unsupported value: "Sometimes"'),
        ("demo", {"serving": {"httpPort": 9000}}, "serving.httpPort must differ from serving.grpcPort"),
        ("demo", {"serving": {"httpPort": 8265}}, "serving.httpPort must not be a Ray head port"),
        ("demo", {"serving": {"httpPort": 0}}, "spec.serving.httpPort in body should be greater than"),
        (
            "demo",
            {"serving": {"engine": {"prefixCaching": "no"}}},
            "spec.serving.engine.prefixCaching in body must be of type boolean",
        ),
        (
            "demo",
            {"serving": {"engine": {"speculative": "eagle"}}},
            'spec.serving.engine.speculative: Unsupported value: "eagle"',
        ),
        (
            "demo",
            {"serving": {"engine": {"speculative": "mtp", "numSpeculativeTokens": 4}}},
            "spec.serving.engine.numSpeculativeTokens in body should be less than or equal to 3",
        ),
        ("9lives", {}, "metadata.name must be a DNS label of at most 50 characters starting with a letter"),
        ("x" * 51, {}, "metadata.name must be a DNS label of at most 50 characters"),
    ],
)
def test_the_api_server_rejects_invalid_moeservices_with_clear_messages(
    installed: Installed, kubectl: Kubectl, tmp_path: Path, name: str, spec: Json, message: str
) -> None:
    manifest = moeservice(name, **spec)
    path = tmp_path / "invalid.yaml"
    path.write_text(yaml.safe_dump(manifest))
    done = kubectl("apply", "--dry-run=server", "-n", installed.namespace, "-f", str(path), check=False)
    assert done.returncode != 0, f"accepted: {spec}"
    assert message in done.stderr, done.stderr


@pytest.mark.parametrize(
    "volume",
    [
        {"persistentVolumeClaim": {"claimName": "models"}},
        {"hostPath": {"path": "/data/models"}},
        {"image": {"reference": "registry.invalid/tiny-model:1", "pullPolicy": "IfNotPresent"}},
        {"nfs": {"server": "nfs.example", "path": "/export/models"}},
        {"csi": {"driver": "blob.csi.azure.com", "volumeAttributes": {"container": "models"}}},
    ],
)
def test_every_volume_source_is_accepted_and_cpu_only_ranks_too(
    installed: Installed, kubectl: Kubectl, tmp_path: Path, volume: Json
) -> None:
    manifest = moeservice(
        "ok",
        model={"path": "/models/tiny", "volume": volume, "subPath": "tiny"},
        attention={"gpusPerRank": 0},
        experts={"gpusPerRank": 0},
    )
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(manifest))
    done = kubectl("apply", "--dry-run=server", "-o", "json", "-n", installed.namespace, "-f", str(path))
    stored = json.loads(done.stdout)["spec"]
    assert stored["model"]["volume"] == volume, "the API server must keep the volume as given"
    assert stored["probes"] == {"startupSeconds": 600}
    assert stored["scheduling"]["packing"] == "Preferred"
    assert stored["model"]["dtype"] == "auto", "decided on the ranks' host unless given"


def test_model_path_and_ranks_cannot_change_but_replicas_can(
    installed: Installed, kubectl: Kubectl, tmp_path: Path
) -> None:
    apply(kubectl, tmp_path, installed.namespace, moeservice("frozen", replicas=0))
    for patch, message in [
        ({"model": {"path": "/models/other"}}, "model.path is immutable"),
        ({"attention": {"ranks": 3}}, "attention.ranks is immutable"),
        ({"experts": {"ranks": 1}}, "experts.ranks is immutable"),
    ]:
        done = kubectl(
            "patch",
            "moe",
            "frozen",
            "-n",
            installed.namespace,
            "--type=merge",
            "-p",
            json.dumps({"spec": patch}),
            check=False,
        )
        assert done.returncode != 0 and message in done.stderr, done.stderr
    kubectl(
        "patch",
        "moe",
        "frozen",
        "-n",
        installed.namespace,
        "--type=merge",
        "-p",
        '{"spec": {"replicas": 0, "image": "x:2"}}',
    )
    kubectl("delete", "moe", "frozen", "-n", installed.namespace)


# -- the operator --------------------------------------------------------------------------------


def test_example_gets_every_child_and_a_status_that_says_what_is_missing(
    ns: str, operator: Operator, cluster: Cluster, kubectl: Kubectl, tmp_path: Path
) -> None:
    manifest = example()
    name = manifest["metadata"]["name"]
    claim = models_claim(kubectl, tmp_path, ns)
    apply(kubectl, tmp_path, ns, manifest)
    seen: set[tuple[str, str]] = set()

    def settled() -> Json:
        moe = cluster.moe(ns, name)
        for c in moe.get("status", {}).get("conditions", []):
            seen.add((c["type"], f"{c['status']}:{c['reason']}"))
        return moe if condition(moe, "Ready").get("reason") == "RayDashboardUnreachable" else {}

    moe = wait_until("Ready=False RayDashboardUnreachable", settled, timeout_s=90, interval_s=0.1)
    uid = moe["metadata"]["uid"]

    # pods: Running on the fake GPU nodes, with GPUs, labels and the owner reference
    pods = wait_running(cluster, ns, name, 5)
    assert set(pods) == {
        f"{name}-head",
        *(f"{name}-{r}-{i}" for r in ("attention", "expert") for i in (0, 1)),
    }
    nodes = {node.name for node in DEFAULT_NODES}
    for pod_name, pod in pods.items():
        meta, spec = pod["metadata"], pod["spec"]
        role = meta["labels"][contract.LABEL_ROLE]
        assert meta["labels"][contract.LABEL_SERVICE] == name and pod_name.startswith(f"{name}-{role}")
        assert [(r["kind"], r["uid"], r["controller"]) for r in meta["ownerReferences"]] == [
            ("MoEService", uid, True)
        ]
        assert spec["nodeName"] in nodes
        limits = spec["containers"][0]["resources"].get("limits", {})
        assert limits.get(GPU_RESOURCE) == (None if role == "head" else "1"), (pod_name, limits)
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        # the checkpoint: the example's PVC, read-only at model.path, checked before Ray starts
        assert {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}} in spec[
            "volumes"
        ]
        mount = {
            "name": "model",
            "mountPath": "/models/DeepSeek-V2-Lite",
            "readOnly": True,
            "subPath": "DeepSeek-V2-Lite",
        }
        assert spec["initContainers"][0]["name"] == "model-check"
        for c in (spec["initContainers"][0], spec["containers"][0]):
            assert mount in c["volumeMounts"]
        if role != "head":
            # one instance: packed on a node, then a zone; the API server expanded matchLabelKeys
            assert meta["labels"][contract.LABEL_INSTANCE] == "0"
            terms = spec["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            assert [t["podAffinityTerm"]["topologyKey"] for t in terms] == [
                "kubernetes.io/hostname",
                ZONE_LABEL,
            ]
            assert {"key": contract.LABEL_INSTANCE, "operator": "In", "values": ["0"]} in terms[0][
                "podAffinityTerm"
            ]["labelSelector"]["matchExpressions"]
    assert len({p["spec"]["nodeName"] for n, p in pods.items() if "head" not in n}) == 1, (
        "the four ranks of the instance fit on one node and must land there"
    )

    # Services and the Serve config
    services = {
        s["metadata"]["name"]: s for s in cluster.objects("services", ns, f"{contract.LABEL_SERVICE}={name}")
    }
    assert set(services) == {name, f"{name}-head"}
    head_ports = {p["port"] for p in services[f"{name}-head"]["spec"]["ports"]}
    assert head_ports == {6379, 8265, 9000, 8000}  # GCS, dashboard, Serve gRPC, Serve HTTP
    (config_map,) = cluster.objects("configmaps", ns, f"{contract.LABEL_SERVICE}={name}")
    (secret,) = cluster.objects("secrets", ns, f"{contract.LABEL_SERVICE}={name}")  # the Ray auth token
    assert secret["metadata"]["name"] == f"{name}-ray-auth" and len(secret["data"]["token"]) > 40
    for obj in [*services.values(), config_map, secret]:
        assert [r["uid"] for r in obj["metadata"]["ownerReferences"]] == [uid]
    for pod in pods.values():  # every Ray process authenticates with it
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == f"{name}-ray-auth"
    cfg = ServeAppConfig.from_dict(json.loads(config_map["data"][contract.SERVE_CONFIG_KEY]))
    assert (cfg.replicas, cfg.attention_ranks, cfg.expert_ranks, cfg.model.path) == (
        1,
        2,
        2,
        "/models/DeepSeek-V2-Lite",
    )
    deploy = json.loads(config_map["data"][contract.SERVE_DEPLOY_KEY])
    assert ServeAppConfig.from_dict(deploy["applications"][0]["args"]) == cfg

    # status: Progressing, and Ready=False naming the unreachable dashboard
    assert ("Progressing", "True:CreatingPods") in seen or ("Progressing", "True:WaitingForRay") in seen, seen
    ready = condition(moe, "Ready")
    url = f"http://{name}-head.{ns}.svc:8265/api/serve/applications/"
    assert ready["status"] == "False" and url in ready["message"], ready
    assert (
        condition(moe, "Progressing")["status"] == "True" and condition(moe, "Degraded")["status"] == "False"
    )
    status = moe["status"]
    assert status["observedGeneration"] == moe["metadata"]["generation"]
    assert (status["phase"], status["replicas"], status["readyReplicas"]) == ("Progressing", 1, 0)
    assert status["endpoint"] == f"{name}.{ns}.svc:9000"
    table = kubectl("get", "moe", name, "-n", ns).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "REPLICAS", "ATTENTION", "EXPERTS", "ENDPOINT", "AGE"]
    assert table[1].split()[:6] == [name, "False", "1", "2", "2", f"{name}.{ns}.svc:9000"]
    reasons = {e["reason"] for e in cluster.events(ns, name)}
    assert {"RayHeadCreated", "WorkerGroupCreated"} <= reasons, reasons
    assert "Forbidden" not in operator.log()
    kubectl("delete", "moe", name, "-n", ns)
    kubectl("delete", "pvc", claim, "-n", ns, "--wait=false")
    kubectl("delete", "pv", f"models-{ns}", "--wait=false")


def models_claim(kubectl: Kubectl, tmp_path: Path, namespace: str) -> str:
    """The example's PVC, pre-bound to a static PersistentVolume made for it: this cluster runs no
    volume binder, so the test sets what the binder would (volumeName, bind-completed), which is
    what the scheduler checks. Nothing reads the volume on kwok nodes. Returns the claim's name."""
    claim: Json = yaml.safe_load((CHART / "examples" / "models-pvc.yaml").read_text())
    name, volume_name = claim["metadata"]["name"], f"models-{namespace}"
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": volume_name, "labels": {"moeserve-test": namespace}},
        "spec": {
            "capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"]},
            "accessModes": claim["spec"]["accessModes"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": "/var/lib/moeserve-test-models"},
            "claimRef": {"namespace": namespace, "name": name},
        },
    }
    claim["spec"]["volumeName"] = volume_name
    claim["metadata"]["annotations"] = {"pv.kubernetes.io/bind-completed": "yes"}
    apply(kubectl, tmp_path, namespace, volume)
    apply(kubectl, tmp_path, namespace, claim)
    return name


def test_a_placement_serve_config_rejects_is_degraded_until_fixed(
    ns: str, operator: Operator, cluster: Cluster, kubectl: Kubectl, tmp_path: Path
) -> None:
    apply(kubectl, tmp_path, ns, moeservice("misplaced", experts={"placement": [[0, 1], [1, 2]]}))

    def degraded() -> Json:
        moe = cluster.moe(ns, "misplaced")
        return moe if condition(moe, "Degraded").get("status") == "True" else {}

    moe = wait_until("Degraded=True", degraded, timeout_s=60)
    cond = condition(moe, "Degraded")
    assert cond["reason"] == "InvalidSpec"
    assert cond["message"] == "spec does not validate: placement: experts [1] are hosted more than once"
    assert moe["status"]["phase"] == "Degraded" and condition(moe, "Ready")["status"] == "False"
    assert cluster.pods(ns, "misplaced") == {}
    wait_until(
        "InvalidSpec event",
        lambda: "InvalidSpec" in {e["reason"] for e in cluster.events(ns, "misplaced")},
        30,
    )
    still_bad = {
        "spec": {"experts": {"placement": [[0, 2], [2, 3]]}}
    }  # a spec change that cannot work either
    kubectl("patch", "moe", "misplaced", "-n", ns, "--type=merge", "-p", json.dumps(still_bad))

    def reported() -> Json:
        moe = cluster.moe(ns, "misplaced")
        return moe if "experts [2] are hosted" in condition(moe, "Degraded").get("message", "") else {}

    moe = wait_until("Degraded names the new duplicate", reported, timeout_s=30)
    assert moe["status"]["observedGeneration"] == moe["metadata"]["generation"]
    permanent = "Handler 'spec-changed/spec' failed permanently: spec does not validate"
    wait_until("the spec-change handler fails permanently", lambda: permanent in operator.log(), timeout_s=30)
    assert cluster.pods(ns, "misplaced") == {}
    patch = {"spec": {"experts": {"placement": [[0, 1], [2, 3]]}}}
    kubectl("patch", "moe", "misplaced", "-n", ns, "--type=merge", "-p", json.dumps(patch))
    wait_running(cluster, ns, "misplaced", 5)
    wait_until(
        "Degraded=False",
        lambda: condition(cluster.moe(ns, "misplaced"), "Degraded").get("status") == "False",
        30,
    )
    kubectl("delete", "moe", "misplaced", "-n", ns)


def test_kubectl_scale_changes_the_group_sizes(
    ns: str, cluster: Cluster, kubectl: Kubectl, tmp_path: Path
) -> None:
    apply(kubectl, tmp_path, ns, moeservice("scaled"))
    before = uids(wait_running(cluster, ns, "scaled", 5))
    kubectl("scale", "moe/scaled", "-n", ns, "--replicas=2")
    after = uids(wait_running(cluster, ns, "scaled", 9))
    assert {n: after[n] for n in before} == before, "scaling up must not restart existing pods"
    assert (
        len(cluster.pods(ns, "scaled", "attention")) == 4 and len(cluster.pods(ns, "scaled", "expert")) == 4
    )

    def scale() -> Json:
        answer: Json = json.loads(
            kubectl("get", "moe", "scaled", "-n", ns, "--subresource=scale", "-o", "json").stdout
        )
        return answer

    wait_until("scale status 2", lambda: scale().get("status", {}).get("replicas") == 2, timeout_s=30)
    assert scale()["spec"]["replicas"] == 2
    kubectl("scale", "moe/scaled", "-n", ns, "--replicas=1")
    assert uids(wait_running(cluster, ns, "scaled", 5)) == before
    kubectl("delete", "moe", "scaled", "-n", ns)


def test_deleting_an_expert_pod_restarts_the_expert_group(
    ns: str, cluster: Cluster, kubectl: Kubectl, tmp_path: Path
) -> None:
    apply(kubectl, tmp_path, ns, moeservice("lossy"))
    wait_running(cluster, ns, "lossy", 5)

    def sizes_recorded() -> bool:
        pods = cluster.pods(ns, "lossy", "expert").values()
        return all(p["metadata"]["annotations"].get(contract.ANNOTATION_GROUP_SIZE) == "2" for p in pods)

    wait_until("expert group complete", sizes_recorded, timeout_s=30)
    others = uids(cluster.pods(ns, "lossy", "head")) | uids(cluster.pods(ns, "lossy", "attention"))
    experts = uids(cluster.pods(ns, "lossy", "expert"))
    kubectl("delete", "pod", "lossy-expert-0", "-n", ns, "--wait=false")

    def replaced() -> bool:
        now = cluster.pods(ns, "lossy", "expert")
        return (
            set(now) == set(experts) and running(now) and not set(uids(now).values()) & set(experts.values())
        )

    wait_until("both expert pods replaced", replaced, timeout_s=60)
    assert uids(cluster.pods(ns, "lossy", "head")) | uids(cluster.pods(ns, "lossy", "attention")) == others
    restarts = [e for e in cluster.events(ns, "lossy") if e["reason"] == "WorkerGroupRestart"]
    assert (
        restarts and "expert group" in restarts[0]["message"] and "lossy-expert-0" in restarts[0]["message"]
    )
    kubectl("delete", "moe", "lossy", "-n", ns)


def test_deleting_the_moeservice_removes_every_child(
    ns: str, cluster: Cluster, kubectl: Kubectl, tmp_path: Path
) -> None:
    apply(kubectl, tmp_path, ns, moeservice("doomed"))
    wait_running(cluster, ns, "doomed", 5)
    selector = f"{contract.LABEL_SERVICE}=doomed"
    assert (
        len(cluster.objects("services", ns, selector)) == 2
        and len(cluster.objects("configmaps", ns, selector)) == 1
    )
    kubectl("delete", "moe", "doomed", "-n", ns, "--wait=false")

    def all_gone() -> bool:
        return not any(cluster.objects(kind, ns, selector) for kind in ("pods", "services", "configmaps"))

    wait_until("children garbage-collected", all_gone, timeout_s=60)


def test_a_moeservice_deletes_while_the_operator_is_down(
    k8s_cluster: ControlPlane, core: Any, cluster: Cluster, kubectl: Kubectl, tmp_path: Path
) -> None:
    """No finalizer: deleting a MoEService never waits for the operator; garbage collection removes
    its children."""
    release = install_chart(k8s_cluster, core)
    ns, name = release.namespace, "orphaned"
    operator = Operator(tmp_path / "operator", release.kubeconfig, ns).start()
    try:
        apply(kubectl, tmp_path, ns, moeservice(name))
        wait_running(cluster, ns, name, 5)
        wait_until("a status", lambda: cluster.moe(ns, name).get("status", {}).get("replicas") == 1, 30)
        assert not cluster.moe(ns, name)["metadata"].get("finalizers")
    finally:
        operator.kill()
    try:
        kubectl("delete", "moe", name, "-n", ns)  # returns at once: nothing waits for the operator
        selector = f"{contract.LABEL_SERVICE}={name}"
        wait_until(
            "children garbage-collected",
            lambda: (
                not any(
                    cluster.objects(k, ns, selector) for k in ("pods", "services", "configmaps", "secrets")
                )
            ),
            timeout_s=60,
        )
    finally:
        uninstall_chart(k8s_cluster, core, release)


def test_an_operator_killed_mid_reconcile_converges_without_duplicates(
    k8s_cluster: ControlPlane,
    core: Any,
    cluster: Cluster,
    kubectl: Kubectl,
    tmp_path: Path,
) -> None:
    """An admission policy refuses the third expert pod, so the first operator is killed (SIGKILL)
    with the MoEService half built; the state it leaves is what a kill between any two creations
    leaves (pods are created in order). A second operator, without the policy, completes it."""
    release = install_chart(k8s_cluster, core)
    ns, name = release.namespace, "halfbuilt"
    policy = deny_pods_named("-expert-2", ns)
    apply(kubectl, tmp_path, ns, policy[0])
    apply(kubectl, tmp_path, ns, policy[1])
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe-expert-2"},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }

    wait_until(
        "the admission policy is enforced", lambda: _denied(kubectl, tmp_path, ns, probe), 60, interval_s=1
    )
    first = Operator(tmp_path / "first", release.kubeconfig, ns).start()
    try:
        apply(kubectl, tmp_path, ns, moeservice(name, replicas=2))

        def stuck() -> Json:
            moe = cluster.moe(ns, name)
            return moe if condition(moe, "Degraded").get("reason") == "ChildRejected" else {}

        moe = wait_until("ChildRejected", stuck, timeout_s=60)
        assert "no third expert pod" in condition(moe, "Degraded")["message"]
        first.kill()
        half = uids(cluster.pods(ns, name))
        assert set(half) == {
            f"{name}-head",
            *(f"{name}-attention-{i}" for i in range(4)),
            f"{name}-expert-0",
            f"{name}-expert-1",
        }
        kubectl("delete", "validatingadmissionpolicybinding", policy[1]["metadata"]["name"])
        second = Operator(tmp_path / "second", release.kubeconfig, ns).start()
        try:
            pods = wait_running(cluster, ns, name, 9)
            assert {n: uid for n, uid in uids(pods).items() if n in half} == half, (
                "the half-built pods were kept"
            )
            wait_until(
                "Degraded=False",
                lambda: condition(cluster.moe(ns, name), "Degraded").get("status") == "False",
                30,
            )
            # no duplicates: every object is there exactly once, and nothing else carries the label
            selector = f"{contract.LABEL_SERVICE}={name}"
            names = [p["metadata"]["name"] for p in cluster.objects("pods", ns, selector)]
            assert sorted(names) == sorted({*half, f"{name}-expert-2", f"{name}-expert-3"})
            assert sorted(s["metadata"]["name"] for s in cluster.objects("services", ns, selector)) == [
                name,
                f"{name}-head",
            ]
            assert [c["metadata"]["name"] for c in cluster.objects("configmaps", ns, selector)] == [
                f"{name}-serve-config"
            ]
            # and an operator restarted on a converged service changes nothing
            settled = uids(cluster.pods(ns, name))
            second.kill()
            third = Operator(tmp_path / "third", release.kubeconfig, ns).start()
            time.sleep(6)  # three reconcile intervals
            assert uids(cluster.pods(ns, name)) == settled
            third.stop()
        finally:
            second.stop()
    finally:
        first.stop()
        kubectl(
            "delete", "validatingadmissionpolicybinding", policy[1]["metadata"]["name"], "--ignore-not-found"
        )
        kubectl("delete", "validatingadmissionpolicy", policy[0]["metadata"]["name"], "--ignore-not-found")
        uninstall_chart(k8s_cluster, core, release)


def deny_pods_named(suffix: str, namespace: str) -> tuple[Json, Json]:
    """A ValidatingAdmissionPolicy (and binding) refusing pods whose name ends in `suffix`."""
    name = f"deny-{namespace}"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                    }
                ]
            },
            "validations": [
                {
                    "expression": f"!object.metadata.name.endsWith('{suffix}')",
                    "message": "test policy: no third expert pod",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
            },
        },
    }
    return policy, binding


def _denied(kubectl: Kubectl, tmp_path: Path, namespace: str, pod: Json) -> bool:
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(pod))
    done = kubectl("create", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    return done.returncode != 0 and "no third expert pod" in done.stderr
