"""Hostile but realistic clients against real servers over real gRPC on loopback (issue 13): no
request stops the engine, stalls the server, or reaches what it should not.

One test (or more) per finding: a tiny temperature (with and without expert ranks), a large text
prompt, unbounded stop lists, queue full / stale failure message / gauges after a lost rank with
expert ranks, the rendezvous store's listening address, malformed messages and invalid UTF-8,
request_id amplification, SIGTERM with a Health/Watch stream open, and TLS (with client
certificates) on `moeserve serve`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_support import drain_in_background, scrape, wait_until

from moeserve.workers.client import InferenceClient, build_request
from moeserve.workers.engine import EngineSettings
from moeserve.workers.parallel.settings import EPSettings
from moeserve.workers.server.app import BackgroundServer, local_loader
from moeserve.workers.server.local_ranks import EPFrontend, ep_loader

pytestmark = pytest.mark.integration
SETTINGS = EngineSettings(max_model_len=256, max_num_batched_tokens=128, kv_cache_tokens=8192)
VOCAB = 384  # the serving checkpoint's
TIMEOUT_S = 10.0  # collective timeout of the expert-parallel world


@pytest.fixture(scope="module")
def server(serving_checkpoint: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(local_loader(serving_checkpoint, torch.float32, SETTINGS)) as s:
        yield s


@pytest.fixture()
def client(server: BackgroundServer) -> Iterator[InferenceClient]:
    with InferenceClient(server.address) as c:
        yield c


def rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value


# 1. one request must not kill the engine
@pytest.mark.parametrize("temperature", [1e-42, 1.401298464324817e-45, 1e-7])  # fp32 subnormals
def test_a_tiny_temperature_samples_the_greedy_token_and_the_engine_serves_on(
    client: InferenceClient, temperature: float
) -> None:
    prompt = list(range(3, 20))
    greedy = client.generate(build_request(None, prompt, max_tokens=12, temperature=0.0, ignore_eos=True))
    for top_k, top_p in ((0, 1.0), (1, 1.0), (50, 1e-30)):
        tiny = client.generate(
            build_request(
                None,
                prompt,
                max_tokens=12,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                ignore_eos=True,
                seed=5,
            )
        )
        assert tiny.finish_reason == "length" and tiny.token_ids == greedy.token_ids
    huge = client.generate(build_request(None, prompt, max_tokens=12, temperature=3.4e38, ignore_eos=True))
    assert len(huge.token_ids) == 12 and all(0 <= t < VOCAB for t in huge.token_ids)
    assert client.health() == "SERVING"


# 2. a large text prompt must not freeze the server
def test_a_large_text_prompt_is_tokenized_off_the_event_loop(client: InferenceClient) -> None:
    line = "    def handle(self, request, context):\n        return self.table[request.key] + 1\n"
    prompt = line * ((1 << 20) // len(line))  # just under the 1 MiB default limit
    errors: list[grpc.RpcError] = []
    big = threading.Thread(
        target=lambda: errors.append(rpc_error(lambda: client.generate(build_request(prompt, max_tokens=1)))),
    )
    latencies: list[float] = []
    big.start()
    while big.is_alive():  # health checks while the prompt is being tokenized
        start = time.monotonic()
        assert client.health(timeout=30) == "SERVING"
        latencies.append(time.monotonic() - start)
    big.join()
    assert errors[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert errors[0].details().startswith("prompt: ") and "max model length" in errors[0].details()
    assert len(latencies) >= 3, latencies  # tokenizing took a while, and health answered meanwhile
    assert max(latencies) < 1.0, latencies
    over = rpc_error(lambda: client.generate(build_request("x" * ((1 << 20) + 1), max_tokens=1)))
    assert over.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert over.details() == "prompt: 1048577+ bytes of text, at most 1048576 allowed"


# 3. stop lists are bounded, and matching a full one still cuts the text right
def test_stop_lists_beyond_the_limits_are_refused_by_field(client: InferenceClient) -> None:
    many = rpc_error(lambda: client.generate(build_request(None, [5], max_tokens=2, stop=["x"] * 10_000)))
    assert many.code() == grpc.StatusCode.INVALID_ARGUMENT and many.details().startswith(
        "sampling.stop: 10000"
    )
    big = rpc_error(lambda: client.generate(build_request(None, [5], max_tokens=2, stop=["y" * 17_000])))
    assert big.code() == grpc.StatusCode.INVALID_ARGUMENT and big.details().startswith("sampling.stop: ")
    ids = rpc_error(
        lambda: client.generate(build_request(None, [5], max_tokens=2, stop_token_ids=[7] * 1_000_000))
    )
    assert ids.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ids.details() == "sampling.stop_token_ids: 1000000 stop token ids, at most 1024 allowed"


def test_a_full_stop_list_at_the_limits_cuts_the_text_where_one_stop_matches(client: InferenceClient) -> None:
    request = build_request("def main():\n", None, max_tokens=40, temperature=0.0, ignore_eos=True)
    free = client.generate(request)
    text = free.text
    cut = next(i for i in range(len(text) // 3, len(text) - 3) if text.find(text[i : i + 3]) == i)
    target = text[cut : cut + 3]  # first seen at `cut`
    decoys = [f"\x00decoy{i:03d}" + "z" * 54 for i in range(255)]  # 255 x 64 bytes + 3: under 16 KiB
    request.sampling.stop.extend([*decoys, target])
    stopped = client.generate(request)
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:cut]


# 6. malformed messages and invalid UTF-8
@pytest.mark.parametrize(
    ("method", "data"),
    [
        ("/moeserve.v1.Inference/Generate", b"\xff\xff\xff"),  # not a protobuf message
        ("/moeserve.v1.Inference/Generate", b"\x0a\x02\xc3\x28"),  # request_id: invalid UTF-8
        ("/moeserve.v1.Inference/Generate", b"\x22\x03\x32\x01\xff"),  # sampling.stop: invalid UTF-8
        ("/moeserve.v1.Inference/GetModelInfo", b"\x08"),  # a truncated field
        ("/grpc.health.v1.Health/Check", b"\x0a\x05ab"),  # a length past the end
        ("/grpc.health.v1.Health/Watch", b"\x0a\x01\xfe"),
    ],
)
def test_bytes_that_are_not_a_valid_message_are_invalid_argument(
    server: BackgroundServer, client: InferenceClient, method: str, data: bytes
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        if method.endswith(("Generate", "Watch")):
            call = channel.unary_stream(method)(data, timeout=10)
            error = rpc_error(lambda: list(call))
        else:
            error = rpc_error(lambda: channel.unary_unary(method)(data, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details().startswith("request: not a valid message for " + method)
    assert client.generate(build_request(None, [3], max_tokens=2, ignore_eos=True)).completion_tokens == 2


# 7. request_id amplification
def test_the_request_id_is_limited_and_returned_once(client: InferenceClient) -> None:
    rid = "r" * 256
    chunks = list(client.stream(build_request(None, [4, 5], max_tokens=20, ignore_eos=True, request_id=rid)))
    assert len(chunks) == 20
    assert chunks[0].request_id == rid and all(c.request_id == "" for c in chunks[1:])
    assert client.generate(build_request(None, [4], max_tokens=3, request_id="mine")).request_id == "mine"
    for chars in (129, 1 << 19):  # "é" is 2 bytes: 258 bytes, 1 MiB
        request = build_request(None, [4], max_tokens=3, request_id="é" * chars)
        too_long = rpc_error(lambda r=request: client.generate(r))  # type: ignore[misc]
        assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert too_long.details().startswith("request_id: ") and "at most 256 allowed" in too_long.details()


# 1, 4, 5 with expert ranks
# A 40-token prompt takes 3 of the 4 blocks: one request runs at a time, one waits on the rank, and
# the front end (which allows max_num_seqs + max_waiting per rank) sends more than the rank takes.
EP_SETTINGS = EngineSettings(
    block_size=16,
    kv_cache_tokens=64,
    max_model_len=64,
    max_num_seqs=8,
    max_waiting=1,
    max_num_batched_tokens=64,
)


@pytest.fixture(scope="module")
def ep_server(serving_checkpoint: Path) -> Iterator[BackgroundServer]:
    ep = EPSettings(1, 2, collective_timeout_s=TIMEOUT_S, startup_timeout_s=120)
    with BackgroundServer(ep_loader(serving_checkpoint, torch.float32, EP_SETTINGS, ep)) as s:
        yield s


def frontend(server: BackgroundServer) -> EPFrontend:
    assert server.server is not None and server.server.state.backend is not None
    loop = server.server.state.backend.loop
    assert isinstance(loop, EPFrontend)
    return loop


def test_expert_parallel_nothing_listens_beyond_loopback_once_the_ranks_joined(
    ep_server: BackgroundServer,
) -> None:
    listening = [c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert listening and all(
        ipaddress.ip_address(a.ip.removeprefix("::ffff:")).is_loopback for a in listening
    )


def test_expert_parallel_tiny_temperature_keeps_every_rank_serving(ep_server: BackgroundServer) -> None:
    with InferenceClient(ep_server.address) as client:
        prompt = list(range(3, 12))
        greedy = client.generate(build_request(None, prompt, max_tokens=8, temperature=0.0, ignore_eos=True))
        tiny = client.generate(build_request(None, prompt, max_tokens=8, temperature=1e-42, ignore_eos=True))
        assert tiny.token_ids == greedy.token_ids and tiny.finish_reason == "length"
        assert client.health() == "SERVING"


def test_expert_parallel_queue_full_then_a_lost_rank_reports_its_own_failure_and_idle_gauges(
    ep_server: BackgroundServer,
) -> None:
    long = build_request(None, list(range(2, 42)), max_tokens=20, ignore_eos=True)
    with InferenceClient(ep_server.address) as client, ThreadPoolExecutor(8) as pool:

        def attempt(_: int) -> str:
            try:
                client.generate(long)
                return "OK"
            except grpc.RpcError as e:
                return f"{e.code().name}: {e.details()}"

        results = list(pool.map(attempt, range(8)))
        refused = [r for r in results if r != "OK"]
        assert refused and "OK" in results, results
        assert all(r.startswith("RESOURCE_EXHAUSTED") for r in refused), results
        assert any("waiting queue is full" in r for r in refused), results  # refused by the rank itself
        assert client.health() == "SERVING"

        call = client.stream(long)
        next(call)
        wait_until(lambda: scrape(ep_server)["moeserve_requests_running"] == 1, timeout=5)
        reader, errors = drain_in_background(call)
        os.kill(frontend(ep_server).pid(2), signal.SIGKILL)  # the second expert rank
        reader.join(TIMEOUT_S + 10)
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE
        assert "expert rank 1" in errors[0].details() and "queue" not in errors[0].details(), errors[
            0
        ].details()
        wait_until(lambda: client.health() == "NOT_SERVING", timeout=5)
        metrics = scrape(ep_server)
        assert metrics["moeserve_requests_running"] == metrics["moeserve_requests_waiting"] == 0
        assert metrics["moeserve_kv_blocks_used"] == 0


# 8. bounded shutdown, 9. TLS: `moeserve serve` processes
def start_serve(checkpoint: Path, *flags: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moeserve.workers.cli.main",
            "serve",
            "--model",
            str(checkpoint),
            "--host",
            "127.0.0.1",
        ]
        + ["--port", "0", "--no-metrics", "--http-port", "0", "--max-model-len", "256", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert match, line
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # never block on a full pipe
    return proc, int(match.group(1))


def test_sigterm_ends_within_grace_plus_2_s_with_a_health_watch_open(serving_checkpoint: Path) -> None:
    proc, port = start_serve(serving_checkpoint, "--grace", "1")
    try:
        with InferenceClient(f"127.0.0.1:{port}") as client:
            client.wait_serving(timeout=120)
            watch = health_pb2_grpc.HealthStub(client.channel).Watch(
                health_pb2.HealthCheckRequest(service="")
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stream = client.stream(build_request(None, [2, 3], max_tokens=250, ignore_eos=True))
            next(stream)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            took = time.monotonic() - start
        assert took < 1 + 2, f"SIGTERM took {took:.1f} s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


KeyPair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def pem_pair(subject: str, issuer: KeyPair | None, ca: bool = False) -> KeyPair:
    """A certificate for `subject` (for localhost and 127.0.0.1 unless a CA), signed by `issuer`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def write_pem(
    path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[bytes, bytes]:
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = (
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        if key is not None
        else b""
    )
    path.with_suffix(".crt").write_bytes(cert_pem)
    if key is not None:
        path.with_suffix(".key").write_bytes(key_pem)
    return cert_pem, key_pem


def test_serve_over_tls_with_client_certificates(serving_checkpoint: Path, tmp_path: Path) -> None:
    ca = pem_pair("moeserve test CA", None, ca=True)
    server_cert, server_key = pem_pair("localhost", ca)
    client_cert, client_key = pem_pair("a client", ca)
    ca_pem, _ = write_pem(tmp_path / "ca", ca[0])
    write_pem(tmp_path / "server", server_cert, server_key)
    client_pem, client_key_pem = write_pem(tmp_path / "client", client_cert, client_key)
    stranger = pem_pair("stranger", None, ca=True)  # a CA the server does not trust
    stranger_cert, stranger_key = pem_pair("stranger client", stranger)
    stranger_pem, stranger_key_pem = write_pem(tmp_path / "stranger", stranger_cert, stranger_key)
    proc, port = start_serve(
        serving_checkpoint,
        *("--tls-cert", str(tmp_path / "server.crt"), "--tls-key", str(tmp_path / "server.key")),
        *("--tls-client-ca", str(tmp_path / "ca.crt")),
    )
    address = f"127.0.0.1:{port}"
    try:
        trusted = grpc.ssl_channel_credentials(ca_pem, client_key_pem, client_pem)
        with InferenceClient(address, trusted) as client:
            client.wait_serving(timeout=120)
            done = client.generate(build_request(None, [1, 2, 3], max_tokens=6, temperature=0.0))
            assert done.completion_tokens == 6 and all(0 <= t < VOCAB for t in done.token_ids)
        refused = {
            "plaintext": None,
            "no client certificate": grpc.ssl_channel_credentials(ca_pem),
            "untrusted client certificate": grpc.ssl_channel_credentials(
                ca_pem, stranger_key_pem, stranger_pem
            ),
        }
        for what, credentials in refused.items():
            with InferenceClient(address, credentials) as client:
                error = rpc_error(lambda c=client: c.health(timeout=5))  # type: ignore[misc]
                assert error.code() == grpc.StatusCode.UNAVAILABLE, what
        stranger_ca = stranger[0].public_bytes(serialization.Encoding.PEM)
        distrusting = grpc.ssl_channel_credentials(stranger_ca, client_key_pem, client_pem)
        with InferenceClient(address, distrusting) as client:  # a client that does not trust the server
            assert rpc_error(lambda: client.health(timeout=5)).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
