"""`moeserve serve` with expert ranks: A attention-rank and E expert-rank local processes (gloo) behind
the same gRPC API give the single-process server's greedy outputs; validation, cancellation and the
loss of a rank behave as the API promises."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from conftest import MAIN_SETTINGS
from serving_support import wait_until

from moeserve.v1 import inference_pb2 as pb
from moeserve.workers.client import InferenceClient, build_request
from moeserve.workers.ep_rank import EPSettings
from moeserve.workers.server.app import BackgroundServer, local_loader
from moeserve.workers.server.ep_frontend import EPFrontend, ep_loader

pytestmark = pytest.mark.integration
TIMEOUT_S = 10.0  # collective timeout of the expert-parallel worlds here


def greedy_requests() -> list[pb.GenerateRequest]:
    prompts = [list(range(3, 8)), list(range(20, 37)), list(range(40, 73)), [9], list(range(100, 120))]
    requests = [
        build_request(None, p, max_tokens=6 + i, temperature=0.0, request_id=f"g-{i}")
        for i, p in enumerate(prompts)
    ]
    return [*requests, build_request("experts route latent", None, max_tokens=5, temperature=0.0)]


def run_concurrently(address: str, requests: list[pb.GenerateRequest]) -> list[tuple]:
    with InferenceClient(address) as client, ThreadPoolExecutor(len(requests)) as pool:
        done = list(pool.map(client.generate, requests))
    return [(c.token_ids, c.text, c.finish_reason, c.completion_tokens) for c in done]


@pytest.fixture(scope="module")
def reference(serving_checkpoint: Path) -> list[tuple]:
    with BackgroundServer(local_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS)) as server:
        return run_concurrently(server.address, greedy_requests())


def ep_server(path: Path, attention: int, expert: int) -> BackgroundServer:
    settings = EPSettings(attention, expert, collective_timeout_s=TIMEOUT_S, startup_timeout_s=120)
    return BackgroundServer(ep_loader(path, torch.float32, MAIN_SETTINGS, settings), metrics=False)


def frontend(server: BackgroundServer) -> EPFrontend:
    assert server.server is not None and server.server.state.backend is not None
    loop = server.server.state.backend.loop
    assert isinstance(loop, EPFrontend)
    return loop


@pytest.fixture(scope="module", params=[(1, 2), (2, 1)], ids=["A1-E2", "A2-E1"])
def server(request: pytest.FixtureRequest, serving_checkpoint: Path) -> Iterator[BackgroundServer]:
    with ep_server(serving_checkpoint, *request.param) as s:
        yield s


def test_concurrent_greedy_outputs_match_the_single_process_server(
    server: BackgroundServer, reference: list[tuple]
) -> None:
    assert run_concurrently(server.address, greedy_requests()) == reference
    with InferenceClient(server.address) as client:
        info = client.model_info()
        layout = frontend(server).layout
        assert (info.attention_ranks, info.expert_ranks) == (layout.attention_ranks, layout.expert_ranks)
    if layout.attention_ranks > 1:  # both attention ranks served some of them
        assert all(s["steps"] > 0 for s in frontend(server).rank_stats())


def test_bad_input_is_invalid_argument(server: BackgroundServer) -> None:
    with InferenceClient(server.address) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate(build_request(None, [1, 10_000], max_tokens=2))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt_token_ids" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            client.generate(build_request(None, [5], max_tokens=2, top_p=1.5))
        assert (
            info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.top_p" in info.value.details()
        )


def test_cancelled_stream_frees_its_kv_blocks_on_the_rank(server: BackgroundServer) -> None:
    with InferenceClient(server.address) as client:
        call = client.stream(build_request(None, list(range(2, 50)), max_tokens=200, ignore_eos=True))
        for _ in range(3):
            next(call)
        assert sum(s["kv_blocks_used"] for s in frontend(server).rank_stats()) > 0
        call.cancel()
        wait_until(
            lambda: all(
                s == {**s, "kv_blocks_used": 0, "requests": 0} for s in frontend(server).rank_stats()
            ),
            timeout=TIMEOUT_S,
        )
        assert client.generate(build_request(None, [3], max_tokens=2)).finish_reason == "length"


def test_a_killed_expert_rank_ends_streams_unavailable_and_health_not_serving(
    serving_checkpoint: Path,
) -> None:
    with ep_server(serving_checkpoint, 1, 2) as server, InferenceClient(server.address) as client:
        assert client.health() == "SERVING"
        call = client.stream(build_request(None, list(range(2, 30)), max_tokens=220, ignore_eos=True))
        next(call)
        errors: list[grpc.RpcError] = []

        def drain() -> None:
            try:
                for _ in call:
                    pass
            except grpc.RpcError as e:
                errors.append(e)

        reader = threading.Thread(target=drain)
        reader.start()
        started = time.monotonic()
        os.kill(frontend(server).pid(2), signal.SIGKILL)  # global rank 2: the second expert rank
        reader.join(TIMEOUT_S + 10)
        assert not reader.is_alive() and time.monotonic() - started < TIMEOUT_S + 10
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE, errors
        assert "expert rank 1" in errors[0].details()
        wait_until(lambda: client.health() == "NOT_SERVING", timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            client.generate(build_request(None, [3], max_tokens=2))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
