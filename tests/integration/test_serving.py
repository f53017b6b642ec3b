"""The gRPC API over localhost against one server: concurrency, sampling, cancellation, deadlines,
validation, fuzzing, model info and metrics."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_support import scrape

from moeserve.v1 import inference_pb2 as pb
from moeserve.workers.client import Completion, InferenceClient, build_request
from moeserve.workers.server.app import BackgroundServer

pytestmark = pytest.mark.integration
VOCAB = 384


def mixed_requests(n: int, seed: int = 0) -> list[pb.GenerateRequest]:
    """Prompts of 1-60 tokens (some as text), 1-24 new tokens, assorted stopping and sampling options."""
    rng = random.Random(seed)
    words = ["experts", "route", "Köln", "日本語", "tokens", "🙂", "latent", "cache"]
    requests = []
    for i in range(n):
        kwargs: dict = dict(max_tokens=rng.randint(1, 24), temperature=0.0, request_id=f"mix-{i}")
        if i % 4 == 0:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
            req_args: tuple = (text, None)
        else:
            req_args = (None, [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 60))])
        if i % 5 == 1:
            kwargs.update(temperature=0.9, top_k=rng.choice([0, 5, 50]), top_p=rng.choice([1.0, 0.8]), seed=i)
        if i % 7 == 2:
            kwargs.update(ignore_eos=True)
        if i % 6 == 3:
            kwargs.update(stop_token_ids=rng.sample(range(VOCAB), 40))
        if i % 9 == 4:
            kwargs.update(logprobs=2)
        requests.append(build_request(*req_args, **kwargs))
    return requests


def comparable(c: Completion) -> tuple:
    return (c.token_ids, c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens)


def test_64_concurrent_streams_each_match_the_request_alone(client: InferenceClient) -> None:
    requests = mixed_requests(64)
    alone = [client.generate(r) for r in requests]
    start = threading.Barrier(64)

    def run(request: pb.GenerateRequest) -> Completion:
        start.wait()
        return client.generate(request)

    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(run, requests))
    for request, a, b in zip(requests, alone, together, strict=True):
        assert comparable(b) == comparable(a), request.request_id
        assert b.request_id == request.request_id
    assert {c.finish_reason for c in alone} >= {"length", "stop"}
    assert max(c.chunks for c in together) > 1  # results streamed, not sent at once
    logprob_requests = [c for r, c in zip(requests, together, strict=True) if r.sampling.logprobs]
    assert logprob_requests and all(len(c.logprobs) == len(c.token_ids) for c in logprob_requests)
    assert all(
        len(lp.top) == 2 and lp.top[0].logprob >= lp.logprob for c in logprob_requests for lp in c.logprobs
    )


def test_seeded_sampling_is_reproducible_alone_and_in_a_crowd(client: InferenceClient) -> None:
    request = build_request(prompt_token_ids=[5, 6, 7], max_tokens=20, temperature=1.2, top_p=0.95, seed=1234)
    first = client.generate(request)
    others = mixed_requests(16, seed=3)
    with ThreadPoolExecutor(17) as pool:
        crowd = list(pool.map(client.generate, [*others[:8], request, *others[8:]]))
    assert crowd[8].token_ids == first.token_ids
    other_seed = build_request(
        prompt_token_ids=[5, 6, 7], max_tokens=20, temperature=1.2, top_p=0.95, seed=99
    )
    assert client.generate(other_seed).token_ids != first.token_ids


BAD_REQUESTS = [
    (build_request("hi", [1, 2]), "prompt"),
    (build_request(), "prompt"),
    (build_request(""), "prompt"),
    (build_request(prompt_token_ids=[1, VOCAB]), "prompt_token_ids"),
    (build_request(prompt_token_ids=[1] * 300), "prompt_token_ids"),
    (build_request("cache " * 300), "prompt"),
    (build_request(prompt_token_ids=[1], max_tokens=0), "sampling.max_tokens"),
    (build_request(prompt_token_ids=[1], max_tokens=-3), "sampling.max_tokens"),
    (build_request(prompt_token_ids=[1] * 200, max_tokens=57), "sampling.max_tokens"),
    (build_request(prompt_token_ids=[1], temperature=-0.5), "sampling.temperature"),
    (build_request(prompt_token_ids=[1], top_p=0.0), "sampling.top_p"),
    (build_request(prompt_token_ids=[1], top_p=1.5), "sampling.top_p"),
    (build_request(prompt_token_ids=[1], top_k=-1), "sampling.top_k"),
    (build_request(prompt_token_ids=[1], logprobs=21), "sampling.logprobs"),
    (build_request(prompt_token_ids=[1], stop_token_ids=[VOCAB + 5]), "sampling.stop_token_ids"),
    (build_request(prompt_token_ids=[1], stop=[""]), "sampling.stop"),
]


@pytest.mark.parametrize("request_, field", BAD_REQUESTS)
def test_bad_input_is_invalid_argument_naming_the_field(
    client: InferenceClient, request_: pb.GenerateRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.generate(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:"), info.value.details()
    assert (
        client.generate(
            build_request(prompt_token_ids=[7, 8], max_tokens=3, ignore_eos=True)
        ).completion_tokens
        == 3
    )


def test_a_prompt_filling_all_but_one_position_gets_one_token(client: InferenceClient) -> None:
    done = client.generate(build_request(prompt_token_ids=[2] * 255, temperature=0.0, ignore_eos=True))
    assert done.completion_tokens == 1 and done.finish_reason == "length"


finite = st.floats(allow_nan=True, allow_infinity=True, width=32)
sampling_strategy = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(-3, 12),
        "temperature": st.one_of(finite, st.floats(0, 2, width=32)),
        "top_p": st.one_of(finite, st.floats(0, 1, width=32)),
        "top_k": st.integers(-2, 500),
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.lists(st.text(max_size=3), max_size=2),
        "stop_token_ids": st.lists(st.integers(0, 2**32 - 1), max_size=3),
        "ignore_eos": st.booleans(),
        "logprobs": st.integers(0, 25),
        "request_id": st.text(max_size=8),
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.one_of(st.none(), st.text(max_size=30)),
    ids=st.one_of(
        st.none(), st.lists(st.integers(0, 2**32 - 1), max_size=20), st.lists(st.integers(0, VOCAB - 1))
    ),
    sampling=sampling_strategy,
)
def test_fuzzed_requests_never_break_the_server(client: InferenceClient, prompt, ids, sampling) -> None:
    try:
        done = client.generate(build_request(prompt, ids, **sampling), timeout=60)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
        assert e.details().split(":")[0] in {f for _, f in BAD_REQUESTS}, e.details()
    else:
        assert done.finish_reason in {"stop", "length"}
        assert done.completion_tokens == len(done.token_ids) >= 1
    assert client.health() == "SERVING"


def test_model_info_describes_the_model(client: InferenceClient) -> None:
    info = client.model_info()
    assert info.vocab_size == VOCAB and info.max_model_len == 256 and info.has_tokenizer
    assert info.architecture.model_type == "deepseek_v2" and info.architecture.n_routed_experts == 8
    assert info.architecture.kv_values_per_token_per_layer == 32 + 8
    assert (info.attention_ranks, info.expert_ranks) == (1, 0)
    assert info.kv_block_size == 16 and info.kv_num_blocks == 8192 // 16


def test_metrics_count_requests_latencies_and_routed_tokens(
    server: BackgroundServer, client: InferenceClient
) -> None:
    def routed(metrics: dict[str, float], layer: int) -> float:
        return sum(
            v
            for k, v in metrics.items()
            if k.startswith('moeserve_expert_tokens_total{expert="') and f'layer="{layer}"' in k
        )

    before = scrape(server)
    done = client.generate(build_request(prompt_token_ids=list(range(2, 12)), max_tokens=6, ignore_eos=True))
    after = scrape(server)
    length = 'moeserve_requests_total{finish_reason="length"}'
    assert after[length] == before[length] + 1
    assert (
        after["moeserve_time_to_first_token_seconds_count"]
        == before["moeserve_time_to_first_token_seconds_count"] + 1
    )
    assert (
        after["moeserve_inter_token_latency_seconds_count"]
        == before["moeserve_inter_token_latency_seconds_count"] + 5
    )
    forwarded = done.prompt_tokens + done.completion_tokens - 1  # the last sampled token is never fed back
    for layer in (1, 2):  # MoE layers of the test model (layer 0 is dense); 2 experts per token
        assert routed(after, layer) - routed(before, layer) == 2 * forwarded
    assert after["moeserve_kv_blocks_used"] + after["moeserve_kv_blocks_free"] == 8192 // 16
    assert after["moeserve_requests_waiting"] == 0


def test_health_is_serving_for_the_server_and_the_service(client: InferenceClient) -> None:
    assert client.health("") == "SERVING"
    assert client.health("moeserve.v1.Inference") == "SERVING"
