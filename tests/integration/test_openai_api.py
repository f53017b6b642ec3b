"""The OpenAI HTTP API over real sockets with the official `openai` client (sync and async): the
same tokens as the gRPC API on the same server, chat templates as transformers renders them, the
gRPC API's bad-input table as 400s naming the parameter, 404/429/503, and a client that leaves
mid-stream freeing its KV blocks."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from builders import BOS, EOS
from conftest import MAIN_SETTINGS
from serving_support import scrape, slowed, wait_until

from moeserve.workers.client import InferenceClient, build_request
from moeserve.workers.engine import EngineSettings
from moeserve.workers.model.tokenizer import Tokenizer
from moeserve.workers.server.app import BackgroundServer, local_loader
from moeserve.workers.server.openai_api.chat_template import ChatTemplate
from moeserve.workers.server.openai_api.routes import HTTPOptions

pytestmark = pytest.mark.integration
MODEL = "tiny-chat"
# DeepSeek-V2-Chat's template: BOS, "User: ...\n\n", "Assistant: ...<eos>", system text first.
DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CONVERSATION: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "the cache"},
    {"role": "user", "content": [{"type": "text", "text": "and the "}, {"type": "text", "text": "model?"}]},
]
# The same conversation with the text parts joined, as the server passes it to the template.
CONVERSATION_TEXT = [*CONVERSATION[:3], {"role": "user", "content": "and the model?"}]


@pytest.fixture(scope="module")
def chat_checkpoint(serving_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat") / MODEL
    shutil.copytree(serving_checkpoint, out)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "chat_template": DEEPSEEK_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def server(chat_checkpoint: Path) -> Iterator[BackgroundServer]:
    http = HTTPOptions(0, None, ChatTemplate.from_model_dir(chat_checkpoint))
    with BackgroundServer(local_loader(chat_checkpoint, torch.float32, MAIN_SETTINGS), http=http) as s:
        yield s


def call(url: str, body: dict[str, object] | bytes | None = None) -> tuple[int, dict[str, object]]:
    """(status, JSON body) of a GET, or of a POST of `body`, with the standard library's client."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def open_stream(
    port: int, body: dict[str, object]
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
    )
    return conn, conn.getresponse()


def base_url(server: BackgroundServer) -> str:
    assert server.server is not None and server.server.http_port
    return f"http://127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def api(server: BackgroundServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url(server) + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(server: BackgroundServer) -> Iterator[InferenceClient]:
    with InferenceClient(server.address) as c:
        yield c


def test_models_health_and_metrics(server: BackgroundServer, api: openai.OpenAI) -> None:
    assert [m.id for m in api.models.list().data] == [MODEL]
    assert call(base_url(server) + "/health") == (200, {"status": "serving"})
    api.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2)
    body = urllib.request.urlopen(base_url(server) + "/metrics", timeout=30).read().decode()
    tokens = next(line for line in body.splitlines() if line.startswith("moeserve_generated_tokens_total"))
    assert float(tokens.split()[1]) == scrape(server)["moeserve_generated_tokens_total"] > 0


def test_completion_greedy_equals_grpc_streamed_or_not(
    api: openai.OpenAI, grpc_client: InferenceClient
) -> None:
    ref = grpc_client.generate(build_request("hello there", max_tokens=12, temperature=0.0, ignore_eos=True))
    whole = api.completions.create(
        model=MODEL, prompt="hello there", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert whole.choices[0].text == ref.text and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (ref.prompt_tokens, 12)
    assert whole.usage.total_tokens == ref.prompt_tokens + 12
    chunks = list(
        api.completions.create(
            model=MODEL,
            prompt="hello there",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_prompt_lists_token_ids_stop_and_echo(api: openai.OpenAI, grpc_client: InferenceClient) -> None:
    prompts = [[5, 6, 7], [9, 10]]
    out = api.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, echo=False)
    refs = [
        grpc_client.generate(build_request(prompt_token_ids=p, max_tokens=6, temperature=0.0))
        for p in prompts
    ]
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [r.text for r in refs]
    assert out.usage is not None and out.usage.prompt_tokens == 5
    assert out.usage.completion_tokens == sum(r.completion_tokens for r in refs)
    texts = api.completions.create(model=MODEL, prompt=["hello", "the cache"], max_tokens=4, temperature=0)
    assert len(texts.choices) == 2
    ref = grpc_client.generate(build_request("hello", max_tokens=8, temperature=0.0, ignore_eos=True))
    stop = ref.text[3:5]
    stopped = api.completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=8,
        temperature=0,
        stop=stop,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].text == "hello" + ref.text[: ref.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_n3_with_a_seed_is_reproducible(api: openai.OpenAI, grpc_client: InferenceClient) -> None:
    def sample() -> list[str]:
        out = api.completions.create(
            model=MODEL,
            prompt="hello",
            max_tokens=10,
            n=3,
            seed=7,
            temperature=1.0,
            extra_body={"ignore_eos": True},
        )
        assert out.usage is not None and out.usage.completion_tokens == 30
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = sample()
    assert sample() == first and len(set(first)) > 1
    # choice i is the gRPC request with seed 7 + i
    for i, text in enumerate(first):
        ref = grpc_client.generate(
            build_request("hello", max_tokens=10, seed=7 + i, temperature=1.0, ignore_eos=True)
        )
        assert text == ref.text


def test_logprobs_match_grpc(api: openai.OpenAI, grpc_client: InferenceClient) -> None:
    ref = grpc_client.generate(
        build_request(prompt_token_ids=[5, 6], max_tokens=3, temperature=0.0, logprobs=2)
    )
    out = api.completions.create(model=MODEL, prompt=[5, 6], max_tokens=3, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs == pytest.approx([x.logprob for x in ref.logprobs])
    assert lp.top_logprobs is not None and all(len(t) == 2 for t in lp.top_logprobs)


def hf_tokenizer(chat_checkpoint: Path) -> object:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(chat_checkpoint))


def test_chat_prompt_and_greedy_output_equal_transformers(
    chat_checkpoint: Path, api: openai.OpenAI, grpc_client: InferenceClient
) -> None:
    import transformers

    tok = hf_tokenizer(chat_checkpoint)
    ids = tok.apply_chat_template(CONVERSATION_TEXT, add_generation_prompt=True, tokenize=True)  # type: ignore[attr-defined]
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = list(ids["input_ids"])
    assert ids[0] == 0  # BOS, as a special token
    server_side = ChatTemplate.from_model_dir(chat_checkpoint)
    tokenizer = Tokenizer.from_model_dir(chat_checkpoint)
    assert server_side is not None and tokenizer is not None
    assert tokenizer.encode(server_side.render(CONVERSATION_TEXT)) == ids  # the server's rendering
    out = api.chat.completions.create(
        model=MODEL,
        messages=CONVERSATION,  # type: ignore[arg-type]
        max_completion_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage is not None and out.usage.prompt_tokens == len(ids)  # token for token: below
    model = transformers.AutoModelForCausalLM.from_pretrained(str(chat_checkpoint), dtype=torch.float32)
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False
        )[0, len(ids) :].tolist()
    # the server's tokens for exactly those prompt ids (gRPC gives token ids) are transformers'
    ref = grpc_client.generate(
        build_request(prompt_token_ids=ids, max_tokens=10, temperature=0.0, ignore_eos=True)
    )
    assert ref.token_ids == generated
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"


def test_async_chat_stream_role_first_then_content(api: openai.OpenAI, server: BackgroundServer) -> None:
    whole = api.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=8, temperature=0)  # type: ignore[arg-type]

    async def stream() -> list[object]:
        async with openai.AsyncOpenAI(base_url=base_url(server) + "/v1", api_key="none", max_retries=0) as c:
            s = await c.chat.completions.create(
                model=MODEL,
                messages=CONVERSATION,  # type: ignore[arg-type]
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk async for chunk in s]

    chunks = asyncio.run(stream())
    first = chunks[0].choices[0]  # type: ignore[attr-defined]
    assert first.delta.role == "assistant" and not first.delta.content
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # type: ignore[attr-defined]
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason  # type: ignore[attr-defined]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[attr-defined,union-attr]


VOCAB = 384
# The gRPC API's bad-input table (test_serving.BAD_REQUESTS) as OpenAI bodies, and what only HTTP has.
BAD_BODIES: list[tuple[dict[str, object], str]] = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, VOCAB]}, "prompt"),
    ({"prompt": [1] * 300}, "prompt"),
    ({"prompt": "cache " * 300}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [1], "max_tokens": 0}, "max_tokens"),
    ({"prompt": [1], "max_tokens": -3}, "max_tokens"),
    ({"prompt": [1] * 200, "max_tokens": 57}, "max_tokens"),
    ({"prompt": [1], "temperature": -0.5}, "temperature"),
    ({"prompt": [1], "top_p": 0.0}, "top_p"),
    ({"prompt": [1], "top_p": 1.5}, "top_p"),
    ({"prompt": [1], "top_k": -1}, "top_k"),
    ({"prompt": [1], "logprobs": 21}, "logprobs"),
    ({"prompt": [1], "stop_token_ids": [VOCAB + 5]}, "stop_token_ids"),
    ({"prompt": [1], "stop": [""]}, "stop"),
    ({"prompt": [1], "stop": ["x"] * 300}, "stop"),
    ({"prompt": [1], "n": 0}, "n"),
    ({"prompt": [1], "n": 17}, "n"),
    ({"prompt": [1], "seed": -1}, "seed"),
    ({"prompt": [1], "max_tokens": "many"}, "max_tokens"),
    ({}, "prompt"),
]


@pytest.mark.parametrize("body, param", BAD_BODIES)
def test_bad_input_is_400_naming_the_parameter(
    server: BackgroundServer, api: openai.OpenAI, body: dict[str, object], param: str
) -> None:
    status, answer = call(base_url(server) + "/v1/completions", {"model": MODEL, **body})
    assert status == 400, answer
    error: dict[str, str] = answer["error"]  # type: ignore[assignment]
    assert error["param"] == param and error["message"].startswith(f"{param}:"), error
    assert error["type"] == "invalid_request_error"
    still = api.completions.create(model=MODEL, prompt=[7, 8], max_tokens=3, extra_body={"ignore_eos": True})
    assert still.usage is not None and still.usage.completion_tokens == 3  # type: ignore[union-attr]


def test_chat_errors_and_unknown_model(server: BackgroundServer, api: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="other", prompt="hi", max_tokens=2)
    assert missing.value.body["param"] == "model"  # type: ignore[index]
    for body, param in (
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
            "max_completion_tokens",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30},
            "top_logprobs",
        ),
    ):
        status, answer = call(base_url(server) + "/v1/chat/completions", dict(body))
        assert status == 400 and answer["error"]["param"] == param, answer  # type: ignore[index]
    status, answer = call(base_url(server) + "/v1/completions", b"{not json")
    assert status == 400 and answer["error"]["code"] == "invalid_json"  # type: ignore[index]


def test_model_without_template_answers_400(serving_checkpoint: Path) -> None:
    with BackgroundServer(
        local_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS), http=HTTPOptions(0)
    ) as s:
        status, answer = call(
            base_url(s) + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
        )
        assert status == 400 and "no chat template" in answer["error"]["message"]  # type: ignore[index]


def test_not_serving_is_503(tmp_path: Path) -> None:
    def fail(*_: object) -> object:
        raise RuntimeError("no such model")

    with BackgroundServer(fail, http=HTTPOptions(0)) as s:  # type: ignore[arg-type]
        assert call(base_url(s) + "/health")[0] == 503
        status, answer = call(base_url(s) + "/v1/completions", {"prompt": "hi"})
        assert status == 503 and "no such model" in answer["error"]["message"]  # type: ignore[index]


def test_queue_full_is_429_and_disconnects_free_blocks(serving_checkpoint: Path) -> None:
    settings = EngineSettings(max_num_seqs=1, max_waiting=1, max_model_len=256)
    loader = slowed(local_loader(serving_checkpoint, torch.float32, settings), 0.01)
    with BackgroundServer(loader, http=HTTPOptions(0)) as server:
        assert server.server is not None and server.server.http_port
        port, url = server.server.http_port, base_url(server) + "/v1/completions"
        long: dict[str, object] = {"prompt": list(range(2, 40)), "max_tokens": 200, "ignore_eos": True}
        running, first = open_stream(port, long)
        assert first.status == 200 and first.readline().startswith(b"data: ")  # admitted, generating
        assert scrape(server)["moeserve_kv_blocks_used"] > 0
        waiting, _ = open_stream(port, long)
        wait_until(lambda: scrape(server)["moeserve_requests_waiting"] == 1)
        status, answer = call(url, long)
        assert status == 429 and answer["error"]["code"] == "queue_full"  # type: ignore[index]
        running.close()  # both clients leave mid-stream: their requests are aborted, blocks freed
        waiting.close()
        wait_until(lambda: scrape(server)["moeserve_kv_blocks_used"] == 0, timeout=30)
        metrics = scrape(server)
        assert metrics["moeserve_requests_running"] == 0
        assert metrics['moeserve_requests_total{finish_reason="abort"}'] == 2
        # a client of a non-streamed request that leaves frees its blocks as well
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(long), {"Content-Type": "application/json"})
        wait_until(lambda: scrape(server)["moeserve_kv_blocks_used"] > 0, timeout=30)
        conn.close()
        wait_until(lambda: scrape(server)["moeserve_kv_blocks_used"] == 0, timeout=30)
        assert scrape(server)['moeserve_requests_total{finish_reason="abort"}'] == 3
        status, answer = call(url, {"prompt": [3], "max_tokens": 2})
        assert status == 200 and answer["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
