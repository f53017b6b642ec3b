"""The Ray Serve application on one small local Ray cluster: gRPC through Serve's proxy gives the
single-process server's greedy outputs, and so does the OpenAI HTTP API through Serve's HTTP proxy
(the official `openai` client); two model instances serve together, a killed expert actor ends its
stream UNAVAILABLE and its instance serves again, and bad configs start nothing."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import ray
import torch
from conftest import MAIN_SETTINGS
from ray import serve
from serving_support import drain_in_background, wait_until

from moeserve import contract
from moeserve.serve_config import ServeConfigError
from moeserve.v1 import inference_pb2 as pb
from moeserve.workers.cli.main import default_model_path
from moeserve.workers.client import InferenceClient, build_request
from moeserve.workers.server.app import BackgroundServer, local_loader

pytestmark = pytest.mark.integration
TIMEOUT_S = 10.0
METRICS_WAIT_S = 90.0  # Ray's metrics agent exports what the actors report every few seconds
SERVED_NAME = "tiny-serve"
REBALANCE_INTERVAL = 4  # steps: every instance checks its expert balance while the tests run
# A DeepSeek-V2-style chat template, given as the app's override (`openai.chat_template`).
TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def app_config(path: Path, **changes: Any) -> dict[str, Any]:
    return {
        # auto, decided by each instance's attention rank 0 (`RankWorld.start`): fp32 for this fp32
        # checkpoint on any host, so the outputs equal the fp32 reference
        "model": {"path": str(path), "dtype": "auto"},
        "replicas": 2,
        "attention_ranks": 1,
        "expert_ranks": 2,
        "collective_timeout_s": TIMEOUT_S,
        "rebalance_interval": REBALANCE_INTERVAL,
        "engine": {
            "max_num_batched_tokens": MAIN_SETTINGS.max_num_batched_tokens,
            "kv_cache_tokens": MAIN_SETTINGS.kv_cache_tokens,
            "max_model_len": MAIN_SETTINGS.max_model_len,
        },
        "openai": {"served_model_name": SERVED_NAME, "chat_template": TEMPLATE},
        **changes,
    }


def requests() -> list[pb.GenerateRequest]:
    prompts = [list(range(3, 8)), list(range(20, 37)), list(range(40, 73)), [9], list(range(100, 120))]
    reqs = [build_request(None, p, max_tokens=6 + i, temperature=0.0) for i, p in enumerate(prompts)]
    return [*reqs, build_request("experts route latent", None, max_tokens=5, temperature=0.0)]


def outputs(address: str, reqs: list[pb.GenerateRequest]) -> list[tuple]:
    with InferenceClient(address) as client, ThreadPoolExecutor(len(reqs)) as pool:
        done = list(pool.map(client.generate, reqs))
    return [(c.token_ids, c.text, c.finish_reason) for c in done]


@pytest.fixture(scope="module")
def reference(serving_checkpoint: Path) -> list[tuple]:
    with BackgroundServer(local_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS)) as server:
        return outputs(server.address, requests())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """Where the node's Ray metrics agent serves Prometheus text (what `ray start
    --metrics-export-port` sets on the operator's pods)."""
    return free_port()


@pytest.fixture(scope="module")
def http_port() -> int:
    """Serve's HTTP proxy: the OpenAI HTTP API."""
    return free_port()


@pytest.fixture(scope="module")
def address(serving_checkpoint: Path, metrics_port: int, http_port: int) -> Iterator[str]:
    from ray.serve.config import gRPCOptions

    from moeserve.workers.ray_app.app import build_app

    port = free_port()
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options=gRPCOptions(
                port=port, grpc_servicer_functions=list(contract.SERVE_GRPC_SERVICER_FUNCTIONS)
            ),
        )
        serve.run(build_app(app_config(serving_checkpoint)), name="moeserve")
        yield f"127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def rank_actors(role: str) -> dict[str, Any]:
    """name -> handle of the live rank actors of a role."""
    from moeserve.workers.ray_app.ranks import ACTOR_PREFIX

    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if name.startswith(ACTOR_PREFIX) and f"-{role}-" in name:
            try:
                found[name] = ray.get_actor(name, namespace=entry["namespace"])
            except ValueError:
                pass
    return found


def test_serve_cli_with_ray_and_mtp_drafts_serves_then_stops_cleanly_on_sigterm() -> None:
    """Runs first, before the module's cluster exists: it starts and stops a Ray of its own. The
    embedded model drafts with its MTP layer (`--speculative mtp`), whose experts live on the expert
    rank actors: greedy tokens equal the single-process server's without drafts."""
    model = default_model_path()
    prompt = "import os\nimport sys\n\n\ndef main():\n    "
    greedy = build_request(prompt, None, max_tokens=24, temperature=0.0)
    with BackgroundServer(local_loader(model, torch.float32, MAIN_SETTINGS)) as plain:
        with InferenceClient(plain.address) as client:
            reference = list(client.generate(greedy).token_ids)
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "moeserve.workers.cli.main", "serve", "--ray", "--model", str(model)]
    cmd += ["--expert-ranks", "2", "--port", str(port), "--max-model-len", "256", "--dtype", "float32"]
    cmd += ["--metrics-port", str(metrics_port), "--http-port", "0"]
    cmd += ["--speculative", "mtp", "--num-speculative-tokens", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "serving through Ray Serve" in line:
                break
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe from filling
        http = re.search(r"OpenAI HTTP API on :(\d+)", line)  # --http-port 0: the port it got, printed
        assert http, line
        status, answer = post(f"http://127.0.0.1:{http.group(1)}/v1/completions", {"prompt": [3, 4, 5]})
        assert status == 200 and answer["usage"]["prompt_tokens"] == 3, answer
        with InferenceClient(f"127.0.0.1:{port}") as client:
            done = client.generate(build_request(None, [3, 4, 5], max_tokens=4, temperature=0.0))
            assert done.completion_tokens == 4
            assert list(client.generate(greedy).token_ids) == reference
            assert any(k.startswith("ray_") for k in scrape(metrics_port, "ray_"))  # Ray's metrics agent
            # the ranks' draft counters reach Ray's metrics agent (reported every few seconds)
            drafted = "ray_moeserve_spec_draft_tokens_total/"
            wait_until(lambda: scrape(metrics_port).get(drafted, 0) > 0, METRICS_WAIT_S)
            assert scrape(metrics_port).get("ray_moeserve_spec_accepted_tokens_total/", 0) > 0
            ray_processes = psutil.Process(proc.pid).children(recursive=True)  # raylet, GCS, workers
            assert ray_processes
            call = client.stream(build_request(None, list(range(2, 30)), max_tokens=220, ignore_eos=True))
            next(call)
            proc.send_signal(signal.SIGTERM)  # with a stream in flight: it must end, not hang
            started = time.monotonic()
            try:
                for _ in call:
                    pass
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), e
            assert time.monotonic() - started < 60
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    _, alive = psutil.wait_procs(ray_processes, timeout=15)
    assert not alive, f"Ray processes left behind: {[p.name() for p in alive]}"


def test_serve_cli_joins_a_token_authenticated_cluster_and_leaves_it_running(
    serving_checkpoint: Path,
) -> None:
    """`--ray-address` on a cluster started elsewhere with Ray token authentication, as the operator
    starts its pods: the app serves, the operator's dashboard client sees it with the token (and is
    refused without), and on SIGTERM only the app goes."""
    import os
    import secrets

    from moeserve.operator.ray_dashboard import DashboardError, ServeClient

    gcs, dashboard, port = free_port(), free_port(), free_port()
    address, token = f"127.0.0.1:{gcs}", secrets.token_hex(32)
    env = {**os.environ, contract.ENV_RAY_AUTH_MODE: "token", contract.ENV_RAY_AUTH_TOKEN: token}
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    start = [*ray_cli, "start", "--head", f"--port={gcs}", "--num-cpus=8", "--disable-usage-stats"]
    start += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"]
    subprocess.run(start, check=True, capture_output=True, timeout=120, env=env)
    try:
        cmd = [sys.executable, "-m", "moeserve.workers.cli.main", "serve", "--ray", "--ray-address", address]
        cmd += ["--model", str(serving_checkpoint), "--port", str(port), "--max-model-len", "256"]
        cmd += ["--no-http"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if "serving through Ray Serve" in line:
                    break
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            with InferenceClient(f"127.0.0.1:{port}") as client:
                done = client.generate(build_request(None, [3, 4, 5], max_tokens=4, temperature=0.0))
            assert done.completion_tokens == 4
            url = f"http://127.0.0.1:{dashboard}"
            apps = ServeClient(timeout_s=30).applications(url, token)
            assert apps[contract.SERVE_APP_NAME]["status"] == "RUNNING"
            with pytest.raises(DashboardError, match="HTTP 401") as refused:
                ServeClient(timeout_s=30).applications(url)
            assert refused.value.reachable
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        probe = (  # the cluster still answers, and the moeserve app is gone from it
            "import ray; from ray import serve; "
            f"ray.init(address='{address}', log_to_driver=False); "
            "print(sorted(serve.status().applications))"
        )
        apps_left = subprocess.run(
            [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=120, env=env
        )
        assert apps_left.stdout.strip().splitlines()[-1] == "[]", apps_left.stdout
    finally:
        subprocess.run([*ray_cli, "stop", "--force"], capture_output=True, timeout=120)


def test_grpc_through_serve_matches_the_single_process_server(address: str, reference: list[tuple]) -> None:
    assert outputs(address, requests()) == reference
    with InferenceClient(address) as client:
        info = client.model_info()
    assert (info.attention_ranks, info.expert_ranks, info.max_model_len) == (1, 2, 256)


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "experts route latent"},
]


def http_outputs(base_url: str) -> dict[str, Any]:
    """What the OpenAI API answers to a fixed set of greedy requests (streamed and not)."""
    import openai

    with openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120) as api:
        out: dict[str, Any] = {"models": [m.id for m in api.models.list().data]}
        prompts: list[Any] = [list(range(3, 8)), list(range(40, 73))]
        done = api.completions.create(model=SERVED_NAME, prompt=prompts, max_tokens=7, temperature=0.0)
        out["completions"] = sorted((c.index, c.text, c.finish_reason) for c in done.choices)
        # cached_tokens (prefix caching) depends on what each server served before: not compared
        out["usage"] = done.usage.model_dump(exclude={"prompt_tokens_details"}) if done.usage else None
        text = api.completions.create(
            model=SERVED_NAME, prompt="experts route latent", max_tokens=5, temperature=0.0
        )
        out["text"] = (text.choices[0].text, text.choices[0].finish_reason)
        stream = api.completions.create(
            model=SERVED_NAME, prompt=prompts[1], max_tokens=9, temperature=0.0, stream=True
        )
        out["streamed"] = "".join(c.choices[0].text for c in stream if c.choices)
        chat = api.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=6, temperature=0.0)  # type: ignore[arg-type]
        usage = chat.usage.model_dump(exclude={"prompt_tokens_details"}) if chat.usage else None
        out["chat"] = (chat.choices[0].message.content, chat.choices[0].finish_reason, usage)
        deltas = api.chat.completions.create(
            model=SERVED_NAME,
            messages=CHAT,
            max_tokens=6,
            temperature=0.0,
            stream=True,  # type: ignore[arg-type]
        )
        out["chat_streamed"] = [(c.choices[0].delta.role, c.choices[0].delta.content) for c in deltas]
    return out


@pytest.fixture(scope="module")
def http_reference(serving_checkpoint: Path) -> dict[str, Any]:
    """The standalone server's OpenAI API answers, with the same served name and template."""
    from moeserve.workers.server.openai_api.chat_template import ChatTemplate
    from moeserve.workers.server.openai_api.routes import HTTPOptions

    template = ChatTemplate.from_model_dir(serving_checkpoint, override_source=TEMPLATE)
    http = HTTPOptions(0, SERVED_NAME, template)
    loader = local_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS)
    with BackgroundServer(loader, http=http) as server:
        assert server.server is not None and server.server.http_port
        return http_outputs(f"http://127.0.0.1:{server.server.http_port}")


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_api_through_serves_http_proxy_matches_the_standalone_server(
    address: str, http_port: int, http_reference: dict[str, Any]
) -> None:
    got = http_outputs(f"http://127.0.0.1:{http_port}")
    assert got == http_reference
    assert got["models"] == [SERVED_NAME] and got["chat"][0]  # the chat template rendered a prompt
    assert got["chat_streamed"][0][0] == "assistant"  # the role first, then the content deltas
    assert "".join(text or "" for _, text in got["chat_streamed"]) == got["chat"][0]


def test_openai_api_through_serve_rejects_bad_input_and_keeps_serving(address: str, http_port: int) -> None:
    import urllib.request

    base = f"http://127.0.0.1:{http_port}"
    for body, param in (
        ({"prompt": [1], "top_p": 1.5}, "top_p"),
        ({"prompt": [1] * 300}, "prompt"),
        ({"prompt": [1], "max_tokens": 0}, "max_tokens"),
        ({"prompt": [1], "n": 0}, "n"),
    ):
        status, answer = post(base + "/v1/completions", {"model": SERVED_NAME, **body})
        assert status == 400 and answer["error"]["param"] == param, answer
        assert answer["error"]["message"].startswith(f"{param}:"), answer
    status, answer = post(base + "/v1/completions", {"model": "other", "prompt": "hi"})
    assert status == 404 and answer["error"]["param"] == "model", answer
    with urllib.request.urlopen(base + "/health", timeout=30) as r:
        assert r.status == 200
    status, answer = post(base + "/v1/completions", {"prompt": [3, 4], "max_tokens": 3, "ignore_eos": True})
    assert status == 200 and answer["usage"]["completion_tokens"] == 3, answer


def test_an_http_client_that_leaves_mid_stream_frees_the_rank(address: str, http_port: int) -> None:
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=120)
    body = {"prompt": list(range(2, 30)), "max_tokens": 220, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")  # generating
    held = [ray.get(a.stats.remote(), timeout=30)["requests"] for a in rank_actors("attention").values()]
    assert sorted(held) == [0, 1]
    conn.close()
    deadline = time.monotonic() + 60  # the proxy notices the disconnect and cancels the replica's request
    while True:
        stats = [ray.get(a.stats.remote(), timeout=30) for a in rank_actors("attention").values()]
        if all(s["requests"] == 0 and s["kv_blocks_used"] == 0 for s in stats):
            break
        assert time.monotonic() < deadline, f"the rank still holds the request: {stats}"
        time.sleep(0.2)


def test_two_model_instances_serve_concurrent_requests(address: str, reference: list[tuple]) -> None:
    many = requests() * 4
    assert outputs(address, many) == reference * 4
    attention = rank_actors("attention")
    assert len(attention) == 2
    steps = [ray.get(a.stats.remote(), timeout=30)["steps"] for a in attention.values()]
    assert all(s > 0 for s in steps), steps


def test_requests_sharing_a_prefix_meet_its_cache_on_one_instance(address: str) -> None:
    system = [(13 * i) % 300 + 2 for i in range(64)]  # 4 blocks, seen by no other test
    with InferenceClient(address) as client:
        done = [
            client.generate(build_request(None, [*system, i + 2], max_tokens=2, temperature=0.0))
            for i in range(6)
        ]
    # the prefix router sends them all to the instance that computed the prefix (Serve's random
    # pick of two would send one of the five to the other instance with probability 31/32)
    assert [c.cached_prompt_tokens for c in done[1:]] == [64] * 5


def health(address: str, service: str = "") -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=30
        )
    return int(reply.status)


def test_health_through_serve(address: str) -> None:
    from grpc_health.v1 import health_pb2

    assert {health(address) for _ in range(6)} == {health_pb2.HealthCheckResponse.SERVING}
    assert health(address, "moeserve.v1.Inference") == health_pb2.HealthCheckResponse.SERVING
    assert health(address, "moeserve.v1.Inference/available") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health(address, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_rebalancing_runs_on_every_instance_and_the_admin_routes_reach_them_all(
    address: str, http_port: int, reference: list[tuple]
) -> None:
    """`rebalance_interval` reaches the ranks (their balancers say it, and checks ran from the
    traffic alone); POST /admin/experts/rebalance runs one more check on each of the two instances;
    outputs stay the single-process server's."""
    import json
    import urllib.error
    import urllib.request

    base = f"http://127.0.0.1:{http_port}/admin/experts"

    def expert_map() -> list[dict[str, Any]]:
        """Every ready instance's answer; none while the ingress sees no ready instance (503)."""
        try:
            with urllib.request.urlopen(base + "/map", timeout=120) as r:
                return json.loads(r.read())["instances"]  # type: ignore[no-any-return]
        except urllib.error.HTTPError as e:
            assert e.code == 503, e.read()
            return []

    wait_until(lambda: len(expert_map()) == 2, timeout=60)  # both instances ready and reported
    assert outputs(address, requests() * 2) == reference * 2
    # nobody asked yet: the interval's checks (one runs at the first control after 4 steps)
    wait_until(lambda: sum(i["checks"] for i in expert_map()) >= 1, timeout=60)
    instances = expert_map()
    assert {i["interval"] for i in instances} == {REBALANCE_INTERVAL}
    assert all("error" not in i and i["layers"] for i in instances), instances

    status, answer = post(base + "/rebalance", {"timeout_s": 90})  # answered before post's 120 s
    assert status == 200, answer
    before = {i["instance"]: i["checks"] for i in instances}
    after = {i["instance"]: i["checks"] for i in answer["instances"]}
    assert after.keys() == before.keys() and all(after[k] > before[k] for k in after), answer
    assert all(isinstance(i["changed"], bool) for i in answer["instances"])
    assert outputs(address, requests()) == reference


def test_bad_input_is_invalid_argument(address: str) -> None:
    with InferenceClient(address) as client, pytest.raises(grpc.RpcError) as info:
        client.generate(build_request(None, [5], max_tokens=2, top_p=1.5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.top_p" in info.value.details()


def scrape(port: int, prefix: str = "ray_moeserve_") -> dict[str, float]:
    """Sum of each `prefix*` sample over its series (instances, ranks, workers), keyed by sample name
    plus, for finished requests, the finish reason."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                key = sample.name + "/" + sample.labels.get("finish_reason", "")
                sums[key] = sums.get(key, 0.0) + sample.value
    return sums


def test_engine_metrics_reach_rays_metrics_endpoint(
    address: str, metrics_port: int, serving_checkpoint: Path
) -> None:
    from moeserve.workers.model.config import ModelConfig

    config = ModelConfig.from_file(serving_checkpoint)
    before = scrape(metrics_port)
    for _ in range(20):  # until earlier tests' counts are exported: two scrapes a second apart agree
        time.sleep(1.0)
        now, before = before, scrape(metrics_port)
        if now == before:
            break
    reqs = requests()
    with InferenceClient(address) as client, ThreadPoolExecutor(len(reqs)) as pool:
        done = list(pool.map(client.generate, reqs))
    generated = sum(c.completion_tokens for c in done)
    prompt = sum(c.prompt_tokens for c in done)
    # every token the model ran went to top-k experts in each MoE layer: all but each request's last
    # (never fed back) and the prompt tokens found in the prefix cache (never computed)
    computed = prompt - sum(c.cached_prompt_tokens for c in done) + generated - len(done)
    routed = computed * config.num_experts_per_tok * len(config.moe_layers)
    want = {
        "ray_moeserve_generated_tokens_total/": generated,
        "ray_moeserve_prompt_tokens_total/": prompt,
        "ray_moeserve_requests_total/length": sum(c.finish_reason == "length" for c in done),
        "ray_moeserve_time_to_first_token_seconds_count/": len(done),
        "ray_moeserve_expert_tokens_total/": routed,
    }
    deadline = time.monotonic() + 60  # generous: a busy 2-core CI machine
    while True:  # the agent exports what workers reported within a couple of report intervals
        after = scrape(metrics_port)
        got = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in want}
        if got == want and after.get("ray_moeserve_kv_blocks_used/") == 0:
            break
        assert time.monotonic() < deadline, f"metrics {got} != {want}"
        time.sleep(0.5)
    assert after["ray_moeserve_kv_blocks_free/"] > 0 and after.get("ray_moeserve_requests_running/") == 0


def test_a_client_deadline_ends_the_stream_and_frees_the_rank(address: str) -> None:
    """Serve's context hides the remaining time, but a call past its deadline is cancelled by the
    proxy, and the cancellation must reach the attention rank (its request aborted, blocks freed)."""
    with InferenceClient(address) as client:
        call = client.stream(build_request(None, list(range(2, 30)), max_tokens=220, ignore_eos=True), 1.0)
        tokens = len(next(call).token_ids)
        held = [ray.get(a.stats.remote())["requests"] for a in rank_actors("attention").values()]
        assert sorted(held) == [0, 1]
        with pytest.raises(grpc.RpcError) as info:
            for reply in call:
                tokens += len(reply.token_ids)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert tokens < 220
    deadline = time.monotonic() + 10
    while True:
        stats = [ray.get(a.stats.remote(), timeout=30) for a in rank_actors("attention").values()]
        if all(s["requests"] == 0 and s["kv_blocks_used"] == 0 for s in stats):
            break
        assert time.monotonic() < deadline, f"the rank still holds the request: {stats}"
        time.sleep(0.2)


def test_a_killed_expert_actor_ends_the_stream_unavailable_and_the_instance_recovers(
    address: str, reference: list[tuple]
) -> None:
    with InferenceClient(address) as client:
        call = client.stream(build_request(None, list(range(2, 30)), max_tokens=220, ignore_eos=True))
        next(call)
        busy = [n for n, a in rank_actors("attention").items() if ray.get(a.stats.remote())["requests"]]
        assert len(busy) == 1
        instance = busy[0].rsplit("-attention-", 1)[0]
        victim = next(a for n, a in rank_actors("expert").items() if n.startswith(instance + "-"))
        statuses: dict[str, set[int]] = {"": set(), "moeserve.v1.Inference/available": set()}
        watching = threading.Event()

        def watch_health() -> None:  # until the stream has ended and the instance is back
            while not watching.is_set():
                for service, seen in statuses.items():
                    seen.add(health(address, service))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch_health)
        watcher.start()
        reader, errors = drain_in_background(call)
        ray.kill(victim, no_restart=True)
        reader.join(TIMEOUT_S + 20)
        assert not reader.is_alive(), "the stream hung"
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE, errors
        # Serve's router hears of the rebuild within a routing-stats period; from then on requests go
        # to the other instance: some finish while the whole service still reports NOT_SERVING.
        from grpc_health.v1 import health_pb2

        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        wait_for = time.monotonic() + 10
        while health(address) != not_serving:
            assert time.monotonic() < wait_for, "health never said NOT_SERVING during the rebuild"
            time.sleep(0.05)
        served_meanwhile = 0
        while health(address) == not_serving:
            try:  # a short deadline: one that the router still sends to the rebuilding instance expires
                done = client.generate(requests()[0], timeout=1.0)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
                continue
            assert (done.token_ids, done.text, done.finish_reason) == reference[0]
            served_meanwhile += health(address) == not_serving
        assert served_meanwhile > 0, "no request finished during the rebuild"
        deadline = time.monotonic() + 60
        while True:  # the instance rebuilds its ranks; every instance serves correctly again
            try:
                assert outputs(address, requests() * 2) == reference * 2
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "no recovery within 60 s"
                time.sleep(1)
        assert len(rank_actors("attention")) == 2 and len(rank_actors("expert")) == 4
        deadline = time.monotonic() + 10  # readiness reaches the health deployment within a beat
        while health(address) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health still NOT_SERVING after recovery"
            time.sleep(0.2)
        watching.set()
        watcher.join()
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        # the whole service was NOT_SERVING while one instance rebuilt; the other kept serving
        assert statuses[""] == {serving, not_serving}, statuses
        assert statuses["moeserve.v1.Inference/available"] == {serving}, statuses


def test_a_killed_attention_actor_rebuilds_its_instance(address: str, reference: list[tuple]) -> None:
    from grpc_health.v1 import health_pb2

    victim_name, victim = sorted(rank_actors("attention").items())[0]
    ray.kill(victim, no_restart=True)
    deadline = time.monotonic() + 20
    while health(address) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health never said NOT_SERVING after the kill"
        time.sleep(0.05)
    deadline = time.monotonic() + 60
    while health(address) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "the instance did not recover within 60 s"
        time.sleep(0.2)
    assert outputs(address, requests() * 2) == reference * 2
    attention = rank_actors("attention")
    assert len(attention) == 2 and victim_name not in attention


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"replicas": 0}, "replicas"),
        ({"engine": {"block_size": 0}}, "engine.block_size"),
        ({"expert_ranks": 2, "placement": [[0, 1], [1]]}, "placement"),
        ({"colective_timeout_s": 3}, "colective_timeout_s"),
        ({"engine": {"speculative": "mtp"}}, "engine.speculative"),  # this checkpoint has no MTP layer
    ],
)
def test_an_invalid_config_is_rejected_naming_the_field(
    serving_checkpoint: Path, changes: dict[str, Any], field: str
) -> None:
    from moeserve.workers.ray_app.app import build_app

    with pytest.raises(ServeConfigError, match=f"^{field}:"):
        build_app(app_config(serving_checkpoint, **changes))
