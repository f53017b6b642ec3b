"""OpenAI requests as `moeserve.v1.GenerateRequest`s, so they pass the gRPC API's own checks
(`server.convert.to_engine`: sizes, prompt, sampling ranges, the engine's limits), and the errors
of those checks as OpenAI errors naming the OpenAI parameter.

What only this API has is checked here, with its own documented limits: the body's size, `n`,
the number of prompts, the model name, the chat template.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic

from moeserve.v1 import inference_pb2 as pb
from moeserve.workers.engine.core import Engine
from moeserve.workers.engine.request import InvalidRequest
from moeserve.workers.model.tokenizer import Tokenizer
from moeserve.workers.server.convert import EngineRequest, to_engine
from moeserve.workers.server.openai_api.chat_template import ChatTemplate, ChatTemplateError
from moeserve.workers.server.openai_api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)

MAX_BODY_BYTES = 16 << 20  # a request body; read before parsing, larger ones get 413
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n of one request


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return {
            400: "invalid_request_error",
            404: "not_found_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(self.status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, problem: str) -> ApiError:
    return ApiError(400, f"{param}: {problem}", param, "invalid_value")


@dataclass(frozen=True)
class Choice:
    """One engine request of an API request: which prompt it answers and its choice index."""

    index: int
    prompt_index: int
    job: EngineRequest
    echo: str = ""


@dataclass(frozen=True)
class Prepared:
    request: CompletionRequest | ChatCompletionRequest
    choices: list[Choice]
    cached: dict[int, int] = field(default_factory=dict, compare=False)
    """choice index -> prompt tokens the prefix cache supplied, filled as choices finish."""

    @property
    def prompt_tokens(self) -> int:
        """Tokens of each prompt, counted once however many choices it has (as OpenAI counts)."""
        return sum(len(c.job.prompt_ids) for c in self.choices if c.index % self.request.n == 0)

    @property
    def cached_tokens(self) -> int:
        """Of `prompt_tokens`, those taken from the prefix cache (each prompt's first choice)."""
        return sum(self.cached.get(c.index, 0) for c in self.choices if c.index % self.request.n == 0)


def parse(model: type[pydantic.BaseModel], body: bytes) -> Any:
    """The request model of a JSON body; 400 naming the first bad parameter."""
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"body: not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "body: must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}", param, "invalid_value") from None


def openai_param(field: str, chat: bool, request: SamplingFields) -> str:
    """The OpenAI parameter of a gRPC field path in an `InvalidRequest`."""
    if field in ("prompt", "prompt_token_ids"):
        return "messages" if chat else "prompt"
    name = field.removeprefix("sampling.")
    if name == "max_tokens" and isinstance(request, ChatCompletionRequest):
        return "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    if name == "logprobs" and chat:
        return "top_logprobs"
    return name


def _set(field: str, assign: Callable[[], object]) -> None:
    """Assign a proto field; a value out of its type's range is the client's error, not ours."""
    try:
        assign()
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidRequest(field, f"out of range ({e})") from None


def _sampling(
    request: SamplingFields, max_tokens: int | None, logprobs: int, seed: int | None
) -> pb.SamplingParams:
    s = pb.SamplingParams(ignore_eos=request.ignore_eos)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    _set("sampling.stop", lambda: s.stop.extend(stop))
    _set("sampling.stop_token_ids", lambda: s.stop_token_ids.extend(request.stop_token_ids or []))
    if max_tokens is not None:
        _set("sampling.max_tokens", lambda: setattr(s, "max_tokens", max_tokens))
    if request.temperature is not None:
        s.temperature = request.temperature
    if request.top_p is not None:
        s.top_p = request.top_p
    if request.top_k is not None:
        _set("sampling.top_k", lambda: setattr(s, "top_k", request.top_k))
    if seed is not None:
        _set("sampling.seed", lambda: setattr(s, "seed", seed))
    _set("sampling.logprobs", lambda: setattr(s, "logprobs", logprobs))
    return s


def _check_counts(request: SamplingFields, prompts: int) -> None:
    if not 1 <= request.n <= MAX_N:
        raise bad("n", f"must be in [1, {MAX_N}], got {request.n}")
    if prompts * request.n > MAX_CHOICES:
        raise bad("n", f"{prompts} prompts x n={request.n} choices, at most {MAX_CHOICES} allowed")


def _prompts(prompt: object) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    assert isinstance(prompt, list)
    if not prompt:
        raise bad("prompt", "must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]  # type: ignore[list-item]
    if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        return list(prompt)  # type: ignore[arg-type]
    raise bad("prompt", "give a string, a list of strings, a list of token ids or a list of such lists")


def _engine_request(
    prompt: str | list[int], sampling: pb.SamplingParams, engine: Engine, tokenizer: Tokenizer | None
) -> EngineRequest:
    request = pb.GenerateRequest(sampling=sampling)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        _set("prompt_token_ids", lambda: request.prompt_token_ids.extend(prompt))
    return to_engine(request, engine, tokenizer)  # the gRPC API's checks, sizes first


def _seed(request: SamplingFields, index: int) -> int | None:
    """Choice `index`'s seed: the request's seed plus the index, so n choices differ, reproducibly."""
    return None if request.seed is None else request.seed + index


def _reseeded(job: EngineRequest, seed: int | None) -> EngineRequest:
    if seed == job.sampling.seed:
        return job
    if seed is not None and seed >= 1 << 64:
        raise InvalidRequest("sampling.seed", f"seed + choice index must be below 2^64, got {seed}")
    return EngineRequest(job.prompt_ids, dataclasses.replace(job.sampling, seed=seed))


def _mapped(chat: bool, request: SamplingFields, build: Callable[[], list[Choice]]) -> list[Choice]:
    try:
        return build()
    except InvalidRequest as e:
        param = openai_param(e.field, chat, request)
        problem = str(e).partition(": ")[2]
        raise bad(param, problem) from None


def prepare_completion(body: bytes, model_name: str, engine: Engine, tokenizer: Tokenizer | None) -> Prepared:
    """Parse, check and tokenize a /v1/completions body (off the event loop: proportional to it)."""
    request: CompletionRequest = parse(CompletionRequest, body)
    check_model(request, model_name)
    prompts = _prompts(request.prompt)
    _check_counts(request, len(prompts))
    if request.echo and request.logprobs is not None:
        raise bad("echo", "echo with logprobs is not supported (no prompt logprobs)")
    # OpenAI's logprobs=0 returns the chosen token's logprob only: the engine is asked for one.
    k = request.logprobs
    logprobs = 0 if k is None else k if k < 0 else max(1, k)

    def build() -> list[Choice]:
        choices = []
        for p, prompt in enumerate(prompts):
            sampling = _sampling(request, request.max_tokens, logprobs, _seed(request, 0))
            first = _engine_request(prompt, sampling, engine, tokenizer)  # tokenized once per prompt
            echo = ""
            if request.echo:
                echo = prompt if isinstance(prompt, str) else (tokenizer.decode(prompt) if tokenizer else "")
            for i in range(request.n):
                job = _reseeded(first, _seed(request, i))
                choices.append(Choice(p * request.n + i, p, job, echo))
        return choices

    return Prepared(request, _mapped(False, request, build))


def prepare_chat(
    body: bytes, model_name: str, engine: Engine, tokenizer: Tokenizer | None, template: ChatTemplate | None
) -> Prepared:
    """Parse, render, check and tokenize a /v1/chat/completions body (off the event loop)."""
    request: ChatCompletionRequest = parse(ChatCompletionRequest, body)
    check_model(request, model_name)
    _check_counts(request, 1)
    if not request.messages:
        raise bad("messages", "must not be empty")
    if template is None:
        raise bad(
            "messages", "this model has no chat template; use /v1/completions or serve with --chat-template"
        )
    limit = engine.settings.limits.max_prompt_bytes
    if sum(len(m.text()) for m in request.messages) > limit:  # before rendering: characters <= bytes
        raise bad("messages", f"more than {limit} bytes of text, at most {limit} allowed")
    try:
        prompt = template.render([{"role": m.role, "content": m.text()} for m in request.messages])
    except ChatTemplateError as e:
        raise bad("messages", str(e)) from None
    max_tokens = request.max_completion_tokens
    if max_tokens is None:
        max_tokens = request.max_tokens
    k = request.top_logprobs or 0
    logprobs = (k if k < 0 else max(1, k)) if request.logprobs else 0

    def build() -> list[Choice]:
        sampling = _sampling(request, max_tokens, logprobs, _seed(request, 0))
        first = _engine_request(prompt, sampling, engine, tokenizer)
        if max_tokens is None:  # chat's default: whatever room the context leaves
            room = max(1, engine.max_model_len - len(first.prompt_ids))
            first = EngineRequest(first.prompt_ids, dataclasses.replace(first.sampling, max_tokens=room))
        return [Choice(i, 0, _reseeded(first, _seed(request, i))) for i in range(request.n)]

    return Prepared(request, _mapped(True, request, build))


def check_model(request: SamplingFields, model_name: str) -> None:
    if request.model is not None and request.model != model_name:
        message = f"model: no model {request.model!r}; this server serves {model_name!r}"
        raise ApiError(404, message, "model", "model_not_found")
