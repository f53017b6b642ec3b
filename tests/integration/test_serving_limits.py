"""Serving under limits and faults: cancellation and deadlines, preemption under a tiny KV budget,
the waiting-queue bound, health while loading, a model that fails to load and an engine that fails
mid-request."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from serving_support import scrape, slowed, wait_until

from moeserve.workers.client import InferenceClient, build_request
from moeserve.workers.engine import EngineSettings
from moeserve.workers.server.app import BackgroundServer, local_loader
from moeserve.workers.server.metrics import ServingMetrics
from moeserve.workers.server.servicer import Backend

pytestmark = pytest.mark.integration
STEP_DELAY = 0.01  # seconds added to every engine step where a test must act while a request runs


@pytest.fixture(scope="module")
def slow_server(serving_checkpoint: Path) -> Iterator[BackgroundServer]:
    settings = EngineSettings(max_model_len=256)
    with BackgroundServer(slowed(local_loader(serving_checkpoint, torch.float32, settings), STEP_DELAY)) as s:
        yield s


@pytest.fixture()
def slow_client(slow_server: BackgroundServer) -> Iterator[InferenceClient]:
    with InferenceClient(slow_server.address) as client:
        yield client


def test_cancelled_stream_frees_its_kv_blocks(
    slow_server: BackgroundServer, slow_client: InferenceClient
) -> None:
    client = slow_client
    idle_used = scrape(slow_server)["moeserve_kv_blocks_used"]
    aborted = scrape(slow_server)['moeserve_requests_total{finish_reason="abort"}']
    call = client.stream(build_request(prompt_token_ids=list(range(2, 50)), max_tokens=200, ignore_eos=True))
    for _ in range(3):
        next(call)
    assert scrape(slow_server)["moeserve_kv_blocks_used"] > idle_used
    call.cancel()
    wait_until(lambda: scrape(slow_server)["moeserve_kv_blocks_used"] == idle_used)
    metrics = scrape(slow_server)
    assert metrics['moeserve_requests_total{finish_reason="abort"}'] == aborted + 1
    assert metrics["moeserve_requests_running"] == 0
    assert (
        client.generate(build_request(prompt_token_ids=[3], max_tokens=2, ignore_eos=True)).finish_reason
        == "length"
    )


def test_deadline_exceeded_ends_the_request(
    slow_server: BackgroundServer, slow_client: InferenceClient
) -> None:
    client = slow_client
    request = build_request(prompt_token_ids=[4, 5], max_tokens=250, ignore_eos=True)
    with pytest.raises(grpc.RpcError) as info:
        client.generate(request, timeout=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: scrape(slow_server)["moeserve_kv_blocks_used"] == 0)
    assert client.generate(build_request(prompt_token_ids=[3], max_tokens=2)).completion_tokens == 2


def test_tiny_kv_budget_forces_preemption_and_outputs_stay_identical(
    serving_checkpoint: Path, client: InferenceClient
) -> None:
    rng = random.Random(5)
    requests = [
        build_request(
            prompt_token_ids=[rng.randrange(2, 384) for _ in range(rng.randint(10, 30))],
            max_tokens=rng.randint(20, 30),
            temperature=0.0,
            ignore_eos=True,
        )
        for _ in range(12)
    ]
    alone = [client.generate(r).token_ids for r in requests]  # main server: ample KV cache
    tiny = EngineSettings(block_size=4, kv_cache_tokens=96, max_model_len=64, max_num_batched_tokens=32)
    with BackgroundServer(local_loader(serving_checkpoint, torch.float32, tiny)) as server:
        with InferenceClient(server.address) as small, ThreadPoolExecutor(12) as pool:
            squeezed = list(pool.map(lambda r: small.generate(r).token_ids, requests))
        metrics = scrape(server)
    assert metrics["moeserve_preemptions_total"] > 0
    assert metrics["moeserve_kv_blocks_used"] == 0
    assert squeezed == alone


def test_full_waiting_queue_is_resource_exhausted(serving_checkpoint: Path) -> None:
    settings = EngineSettings(max_num_seqs=1, max_waiting=1, max_model_len=256)
    loader = slowed(local_loader(serving_checkpoint, torch.float32, settings), STEP_DELAY)
    with BackgroundServer(loader) as server:
        with InferenceClient(server.address) as client:
            long = build_request(prompt_token_ids=[2, 3], max_tokens=250, ignore_eos=True)
            running = client.stream(long)
            next(running)  # admitted and generating
            waiting = client.stream(long)
            wait_until(lambda: scrape(server)["moeserve_requests_waiting"] == 1)
            with pytest.raises(grpc.RpcError) as info:
                client.generate(long)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            running.cancel()
            assert next(waiting).token_ids  # the queued request runs once the first is gone
            waiting.cancel()
            wait_until(lambda: scrape(server)["moeserve_kv_blocks_used"] == 0)


def gated(
    loader: Callable[[ServingMetrics, Callable[[BaseException], None]], Backend], gate: threading.Event
):
    def load(metrics: ServingMetrics, on_failure: Callable[[BaseException], None]) -> Backend:
        assert gate.wait(60)
        return loader(metrics, on_failure)

    return load


def test_health_is_not_serving_until_the_model_is_loaded(serving_checkpoint: Path) -> None:
    gate = threading.Event()
    loader = gated(local_loader(serving_checkpoint, torch.float32, EngineSettings(max_model_len=64)), gate)
    server = BackgroundServer(loader).start(wait_loaded=False)
    try:
        with InferenceClient(server.address) as client:
            assert client.health() == "NOT_SERVING"
            assert client.health("moeserve.v1.Inference") == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as info:
                client.generate(build_request(prompt_token_ids=[1], max_tokens=1))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details()
            gate.set()
            client.wait_serving(timeout=60)
            assert client.generate(build_request(prompt_token_ids=[1], max_tokens=2)).completion_tokens == 2
    finally:
        gate.set()
        server.stop()


def test_a_model_that_fails_to_load_leaves_the_server_not_serving(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with BackgroundServer(local_loader(tmp_path, torch.float32, EngineSettings())) as server:
        with InferenceClient(server.address) as client:
            assert client.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as info:
                client.model_info()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "failed to load" in info.value.details() and "model_type" in info.value.details()


def test_an_engine_failure_is_internal_and_turns_health_not_serving(serving_checkpoint: Path) -> None:
    inner = local_loader(serving_checkpoint, torch.float32, EngineSettings(max_model_len=64))

    def failing(metrics: ServingMetrics, on_failure: Callable[[BaseException], None]) -> Backend:
        backend = inner(metrics, on_failure)

        def broken_step(steps: object) -> torch.Tensor:
            raise RuntimeError("injected device fault")

        backend.loop.engine.runner.step = broken_step  # type: ignore[method-assign]
        return backend

    with BackgroundServer(failing) as server, InferenceClient(server.address) as client:
        assert client.health() == "SERVING"
        with pytest.raises(grpc.RpcError) as info:
            client.generate(build_request(prompt_token_ids=[1, 2], max_tokens=4))
        assert (
            info.value.code() == grpc.StatusCode.INTERNAL and "injected device fault" in info.value.details()
        )
        wait_until(lambda: client.health() == "NOT_SERVING")
        with pytest.raises(grpc.RpcError) as info:
            client.generate(build_request(prompt_token_ids=[1, 2], max_tokens=4))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
