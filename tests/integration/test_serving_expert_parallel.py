"""`moeserve serve` with expert ranks: A attention-rank and E expert-rank local processes (gloo) behind
the same gRPC API give the single-process server's greedy outputs; validation, cancellation and the
loss of a rank behave as the API promises."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from conftest import MAIN_SETTINGS
from serving_support import drain_in_background, scrape, wait_until

from moeserve.v1 import inference_pb2 as pb
from moeserve.workers.client import InferenceClient, build_request
from moeserve.workers.parallel.settings import EPSettings
from moeserve.workers.server.app import BackgroundServer, local_loader
from moeserve.workers.server.local_ranks import EPFrontend, ep_loader
from moeserve.workers.server.rank_process import METRICS_PERIOD_S

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
    return BackgroundServer(ep_loader(path, torch.float32, MAIN_SETTINGS, settings))


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


def test_metrics_count_what_the_rank_engines_did(server: BackgroundServer, serving_checkpoint: Path) -> None:
    """The engines run in rank processes; their events and gauges reach the front end's /metrics."""
    from moeserve.workers.model.config import ModelConfig

    config = ModelConfig.from_file(serving_checkpoint)

    def totals() -> dict[str, float]:
        values = scrape(server)
        out = {k: v for k, v in values.items() if "{" not in k or k.startswith("moeserve_requests_total")}
        for layer in config.moe_layers:
            prefix = "moeserve_expert_tokens_total{"
            out[f"layer {layer}"] = sum(
                v for k, v in values.items() if k.startswith(prefix) and f'layer="{layer}"' in k
            )
        return out

    before = totals()
    for _ in range(20):  # until what earlier tests did has been reported: two reports without change
        time.sleep(2 * METRICS_PERIOD_S)
        now, before = before, totals()
        if now == before:
            break
    reqs = greedy_requests()
    with InferenceClient(server.address) as client, ThreadPoolExecutor(len(reqs)) as pool:
        done = list(pool.map(client.generate, reqs))
    generated = sum(c.completion_tokens for c in done)
    # the last token is never fed back; prompt tokens found in the prefix cache are not computed
    forwarded = sum(c.prompt_tokens - c.cached_prompt_tokens + c.completion_tokens - 1 for c in done)
    want = {
        "moeserve_generated_tokens_total": generated,
        "moeserve_prompt_tokens_total": sum(c.prompt_tokens for c in done),
        "moeserve_time_to_first_token_seconds_count": len(done),
        "moeserve_inter_token_latency_seconds_count": generated - len(done),
        'moeserve_requests_total{finish_reason="length"}': sum(c.finish_reason == "length" for c in done),
        **{f"layer {layer}": config.num_experts_per_tok * forwarded for layer in config.moe_layers},
    }

    def caught_up() -> bool:
        after = totals()
        return {k: after[k] - before[k] for k in want} == want and after["moeserve_kv_blocks_used"] == 0

    try:
        wait_until(caught_up, timeout=15)
    except AssertionError:
        after = totals()
        raise AssertionError(f"{ {k: after[k] - before[k] for k in want} } != {want}") from None
    after = totals()
    ep = frontend(server)  # its never-stepped engine twin has the ranks' allocator, all free
    assert after["moeserve_kv_blocks_free"] == ep.layout.attention_ranks * ep.engine.runner.allocator.num_free
    assert after["moeserve_requests_running"] == after["moeserve_requests_waiting"] == 0


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
        assert (
            client.generate(build_request(None, [3], max_tokens=2, ignore_eos=True)).finish_reason == "length"
        )


def test_a_killed_expert_rank_ends_streams_unavailable_and_health_not_serving(
    serving_checkpoint: Path,
) -> None:
    with ep_server(serving_checkpoint, 1, 2) as server, InferenceClient(server.address) as client:
        assert client.health() == "SERVING"
        call = client.stream(build_request(None, list(range(2, 30)), max_tokens=220, ignore_eos=True))
        next(call)
        reader, errors = drain_in_background(call)
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
