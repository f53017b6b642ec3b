"""A small typed client for a moeserve gRPC server (`moeserve.v1.Inference` + health).

    with InferenceClient("localhost:50051") as client:
        for chunk in client.stream(build_request("Hello", max_tokens=32, temperature=0)):
            print(chunk.text, end="")

Errors surface as `grpc.RpcError` with the server's status code and message. This module has no
torch dependency and knows nothing about the engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeserve.v1 import inference_pb2 as pb
from moeserve.v1 import inference_pb2_grpc as pb_grpc

FINISH_REASON_NAMES = {
    pb.FINISH_REASON_UNSPECIFIED: "",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


@dataclass
class Completion:
    """A whole streamed completion, gathered."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # "stop", "length" or "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens the server's prefix cache supplied
    logprobs: list[pb.TokenLogprobs] = field(default_factory=list)
    chunks: int = 0  # messages received


def build_request(
    prompt: str | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: int = 0,
    request_id: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest; None leaves a field unset (the server's default applies)."""
    sampling = pb.SamplingParams(
        stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos, logprobs=logprobs
    )
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if top_k is not None:
        sampling.top_k = top_k
    if seed is not None:
        sampling.seed = seed
    request = pb.GenerateRequest(
        request_id=request_id, prompt_token_ids=list(prompt_token_ids or []), sampling=sampling
    )
    if prompt is not None:
        request.prompt = prompt
    return request


class InferenceClient:
    """`credentials` (e.g. `grpc.ssl_channel_credentials(root_ca, key, cert)`) for a TLS server."""

    def __init__(self, endpoint: str, credentials: grpc.ChannelCredentials | None = None):
        self.endpoint = endpoint
        self.channel = (
            grpc.secure_channel(endpoint, credentials)
            if credentials is not None
            else grpc.insecure_channel(endpoint)
        )
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def stream(self, request: pb.GenerateRequest, timeout: float | None = None) -> grpc.Call:
        """Stream a completion: iterate the returned call for GenerateResponse messages; `.cancel()`
        it to stop early (the server frees the request's KV blocks at once)."""
        return self.stub.Generate(request, timeout=timeout)  # type: ignore[no-any-return]

    def generate(self, request: pb.GenerateRequest, timeout: float | None = None) -> Completion:
        """Stream a completion and gather it."""
        return gather(self.stream(request, timeout))

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)  # type: ignore[no-any-return]

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """ "SERVING", "NOT_SERVING", ... for `service` ("" = the whole server)."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_serving(self, timeout: float = 300.0) -> None:
        """Block until the server reports SERVING; TimeoutError otherwise."""
        end = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"{self.endpoint} not SERVING after {timeout}s")
            time.sleep(0.1)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def gather(stream: Iterable[pb.GenerateResponse]) -> Completion:
    """Concatenate streamed chunks into one Completion."""
    done = Completion()
    for chunk in stream:
        done.request_id = chunk.request_id or done.request_id  # sent in the first chunk only
        done.token_ids.extend(chunk.token_ids)
        done.text += chunk.text
        done.logprobs.extend(chunk.logprobs)
        done.chunks += 1
        if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            done.finish_reason = FINISH_REASON_NAMES[chunk.finish_reason]
            done.prompt_tokens = chunk.usage.prompt_tokens
            done.completion_tokens = chunk.usage.completion_tokens
            done.cached_prompt_tokens = chunk.usage.cached_prompt_tokens
    return done
