"""What a request is: its sampling parameters (validated), its state in the engine, its outputs.

Field paths in `InvalidRequest` messages follow the gRPC API (`sampling.top_p`, `prompt_token_ids`),
which mirrors the attribute paths here. This module computes nothing about the model.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from moeserve.engine_settings import RequestLimits
from moeserve.workers.engine.text import TextStream
from moeserve.workers.model.kv_cache import SequenceBlocks

FinishReason = Literal["stop", "length", "abort"]
# failed: the engine failed (it serves nothing more); error: this request alone failed (INTERNAL);
# invalid: refused by the engine that was to run it (INVALID_ARGUMENT); queue_full: refused for a
# full waiting queue (RESOURCE_EXHAUSTED); unavailable: the model instance lost a rank.
AbortCause = Literal[
    "cancelled", "deadline", "stopping", "failed", "error", "invalid", "queue_full", "unavailable"
]
MAX_LOGPROBS = 20


class InvalidRequest(ValueError):
    """A request the engine refuses; `field` is the offending field's path, also in the message."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]; 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # top alternatives to return per token; 0 = no logprobs

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int, limits: RequestLimits | None = None) -> None:
        """Raise InvalidRequest naming the first bad field. Sizes are checked before contents."""
        check_stop_sizes(self.stop, len(self.stop_token_ids), limits or RequestLimits())
        if self.max_tokens < 1:
            raise InvalidRequest("sampling.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest("sampling.temperature", f"must be a number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):  # also false for NaN
            raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest("sampling.top_k", f"must be >= 0, got {self.top_k}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest("sampling.logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise InvalidRequest("sampling.stop", "stop strings must not be empty")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(
                "sampling.stop_token_ids", f"ids {bad[:5]} not below vocab size {vocab_size}"
            )


def check_stop_sizes(stop: Sequence[str], num_stop_token_ids: int, limits: RequestLimits) -> None:
    """The stop fields' sizes against `limits` (InvalidRequest naming the field); O(number of stops)."""
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequest(
            "sampling.stop", f"{len(stop)} stop strings, at most {limits.max_stop_strings} allowed"
        )
    chars = sum(len(s) for s in stop)  # <= bytes; encoding is only needed when it is within the limit
    total = chars if chars > limits.max_stop_bytes else sum(len(s.encode()) for s in stop)
    if total > limits.max_stop_bytes:
        raise InvalidRequest(
            "sampling.stop", f"stop strings of {total}+ bytes in all, at most {limits.max_stop_bytes} allowed"
        )
    if num_stop_token_ids > limits.max_stop_token_ids:
        raise InvalidRequest(
            "sampling.stop_token_ids",
            f"{num_stop_token_ids} stop token ids, at most {limits.max_stop_token_ids} allowed",
        )


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one generated position (of the model's raw distribution)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class RequestOutput:
    """New tokens of one request from one step; the last one has `finish_reason` set."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    abort_cause: AbortCause | None = None  # set with finish_reason "abort"
    error: str = ""  # details of an abort, e.g. the exception of a failed engine
    cached_prompt_tokens: int = 0  # prompt tokens the prefix cache supplied (set with finish_reason)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


Sink = Callable[[RequestOutput], None]


class Request:
    """One request's state inside the engine. Touched only by the engine thread once submitted."""

    def __init__(
        self,
        key: int,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        sink: Sink,
        blocks: SequenceBlocks,
        text: TextStream | None,
        deadline: float | None = None,
    ):
        self.key = key  # unique within the engine; request_id need not be
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.sink = sink
        self.blocks = blocks  # blocks.num_tokens = tokens already in the cache
        self.text = text
        self.stop_token_ids = frozenset(sampling.stop_token_ids)  # O(1) per generated token
        self.deadline = deadline  # time.monotonic() value, or None
        self.output_ids: list[int] = []
        self.generator: torch.Generator | None = None
        if not sampling.greedy:
            seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed)
        self.arrival = time.monotonic()
        self.last_token_time: float | None = None
        self.admitted = False  # has been in the running batch at least once
        self.num_preemptions = 0
        self.num_cached_prompt_tokens = 0  # prompt tokens taken from the prefix cache when first admitted
        # speculative decoding (`speculative.py`): drafts to verify next step, the probabilities
        # they were drawn from (sampled requests), and cache slots reserved beyond the drafts
        self.draft_ids: list[int] = []
        self.draft_probs: list[torch.Tensor] = []
        self.lookahead = 0

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what the cache must hold before the next sample."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_computed(self) -> int:
        return self.blocks.num_tokens

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.blocks.num_tokens

    @property
    def num_wanted(self) -> int:
        """Tokens the next step would feed: the uncomputed ones plus any drafts to verify."""
        return self.num_uncomputed + len(self.draft_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the whole list."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]
