"""The serving engine: continuous batching over the paged latent KV cache, one step at a time.

`Engine` schedules requests (chunked prefill under a token budget, admission by free blocks,
preemption by recompute), runs one step through a `ModelRunner`, samples per request and streams
`RequestOutput`s to each request's sink. `EngineLoop` drives it on its own thread. The engine knows
nothing about gRPC or Prometheus; it tokenizes nothing (prompts arrive as ids) and detokenizes only
to stream text and match stop strings.
"""

from moeserve.engine_settings import EngineSettings
from moeserve.workers.engine.core import Engine
from moeserve.workers.engine.loop import EngineFailed, EngineLoop, EngineStopped, QueueFull
from moeserve.workers.engine.request import (
    FinishReason,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
)
from moeserve.workers.engine.runner import LocalModelRunner, ModelRunner

__all__ = [
    "Engine",
    "EngineFailed",
    "EngineLoop",
    "EngineSettings",
    "EngineStopped",
    "FinishReason",
    "InvalidRequest",
    "LocalModelRunner",
    "ModelRunner",
    "QueueFull",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprobs",
]
