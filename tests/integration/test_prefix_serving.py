"""Prefix caching through the servers: cached prompt tokens in gRPC usage and OpenAI
`usage.prompt_tokens_details.cached_tokens`, the per-rank Prometheus counters, and cache-aware
routing between two attention ranks (each system prompt's requests meet on one rank; an overloaded
rank is skipped)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from conftest import MAIN_SETTINGS
from serving_support import scrape

from moeserve.workers.client import Completion, InferenceClient, build_request
from moeserve.workers.engine.request import RequestOutput, SamplingParams
from moeserve.workers.parallel.settings import EPSettings
from moeserve.workers.server.app import BackgroundServer, local_loader
from moeserve.workers.server.local_ranks import EPFrontend, ep_loader
from moeserve.workers.server.openai_api.routes import HTTPOptions

pytestmark = pytest.mark.integration
VOCAB = 384
BLOCK = MAIN_SETTINGS.block_size  # 16
rng = random.Random(17)
SYSTEMS = [[rng.randrange(2, VOCAB) for _ in range(6 * BLOCK)] for _ in range(2)]  # 96 tokens each


def prompt(system: int, i: int) -> list[int]:
    return SYSTEMS[system] + [(7 * i + j) % (VOCAB - 2) + 2 for j in range(8)]  # 104 tokens


def greedy(ids: list[int], max_tokens: int = 6) -> object:
    return build_request(None, ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def server(serving_checkpoint: Path) -> Iterator[BackgroundServer]:
    http = HTTPOptions(0, None, None)
    with BackgroundServer(local_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS), http=http) as s:
        yield s


def test_a_repeated_prefix_is_reported_cached_in_grpc_usage_and_metrics(server: BackgroundServer) -> None:
    before = scrape(server)
    with InferenceClient(server.address) as client:
        first = client.generate(greedy(prompt(0, 1)))
        second = client.generate(greedy(prompt(0, 2)))
        again = client.generate(greedy(prompt(0, 1)))
    after = scrape(server)
    assert (first.cached_prompt_tokens, second.cached_prompt_tokens) == (0, 96)
    assert again.cached_prompt_tokens == 96 and again.token_ids == first.token_ids
    hit = 'moeserve_prefix_cache_hit_tokens_total{rank="0"}'
    queried = 'moeserve_prefix_cache_queried_tokens_total{rank="0"}'
    assert after[hit] - before.get(hit, 0) == 192
    assert after[queried] - before.get(queried, 0) == 3 * 104
    assert after["moeserve_kv_blocks_cached"] >= 6


def test_openai_usage_reports_cached_tokens(server: BackgroundServer) -> None:
    assert server.server is not None and server.server.http_port
    url = f"http://127.0.0.1:{server.server.http_port}/v1"
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60) as api:
        ids = prompt(1, 5)
        first = api.completions.create(model="tiny-v2", prompt=ids, max_tokens=4, temperature=0)
        second = api.completions.create(model="tiny-v2", prompt=ids, max_tokens=4, temperature=0)
        stream = api.completions.create(
            model="tiny-v2",
            prompt=ids,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None and second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 96
    assert second.choices[0].text == first.choices[0].text
    (streamed,) = usages
    assert streamed.prompt_tokens_details is not None and streamed.prompt_tokens_details.cached_tokens == 96


# two attention ranks
def frontend(server: BackgroundServer) -> EPFrontend:
    assert server.server is not None and server.server.state.backend is not None
    loop = server.server.state.backend.loop
    assert isinstance(loop, EPFrontend)
    return loop


@pytest.fixture(scope="module")
def two_ranks(serving_checkpoint: Path) -> Iterator[BackgroundServer]:
    ep = EPSettings(2, 1, collective_timeout_s=10.0, startup_timeout_s=120)
    with BackgroundServer(ep_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS, ep)) as s:
        yield s


def test_each_system_prompt_meets_its_cache_on_one_rank(two_ranks: BackgroundServer) -> None:
    ep = frontend(two_ranks)
    with InferenceClient(two_ranks.address) as client:
        warm = [client.generate(greedy(prompt(s, 0))) for s in (0, 1)]  # one each, in turn
        interleaved = [greedy(prompt(i % 2, i)) for i in range(1, 13)]
        with ThreadPoolExecutor(12) as pool:
            done: list[Completion] = list(pool.map(client.generate, interleaved))
    assert [c.cached_prompt_tokens for c in warm] == [0, 0]
    assert [c.cached_prompt_tokens for c in done] == [96] * 12  # the ideal: every system prompt reused
    stats = ep.rank_stats()
    assert [s["prefix_hit_tokens"] for s in stats] == [6 * 96, 6 * 96]  # one system prompt per rank
    assert [s["prefix_queried_tokens"] for s in stats] == [7 * 104, 7 * 104]


def test_an_overloaded_rank_is_skipped_for_its_prefix(two_ranks: BackgroundServer) -> None:
    ep = frontend(two_ranks)
    ep.route_margin = 1  # a rank may hold one request more than the least loaded and keep its prefix
    outputs: dict[int, RequestOutput] = {}
    finished = threading.Event()

    def sink_for(i: int) -> Callable[[RequestOutput], None]:
        def sink(out: RequestOutput) -> None:
            if out.finished:
                outputs[i] = out
                if len(outputs) == 3:
                    finished.set()

        return sink

    long = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)  # in flight for 120+ steps
    try:
        ranks = []
        for i in range(3):  # before the third: rank 0 has 2 in flight, rank 1 none, and 2 > 0 + 1
            key = ep.submit(prompt(0, 20 + i), long, sink_for(i))
            ranks.append(ep._sinks[key][0])
    finally:
        ep.route_margin = 8
    assert finished.wait(120), "the three requests did not finish"
    holder = ranks[0]  # where system prompt 0 was routed before (or first, when this test runs alone)
    assert ranks == [holder, holder, 1 - holder]
    assert outputs[2].cached_prompt_tokens == 0  # the other rank never saw system prompt 0
    assert [o.finish_reason for o in outputs.values()] == ["length"] * 3
