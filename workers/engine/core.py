"""The engine: one `step()` = schedule, run the model once, sample, stream outputs, retire requests.

Single-threaded by design: every method runs on the engine thread (`EngineLoop`), so request state
needs no locks. Finishing rules: a stop token id or EOS (unless `ignore_eos`) -> "stop" (the id is
returned, its text is not); a stop string -> "stop" (text cut before it); `max_tokens` or the max
model length -> "length"; cancellation, deadline or shutdown -> "abort". A finished or aborted
request's KV blocks are freed in the same call. Fault isolation: an exception while sampling,
detokenizing or matching stops for one request aborts that request alone (cause "error"); only a
failure of the step itself (scheduling, the forward) escapes `execute` and fails the engine.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import cast

import torch

from moeserve.engine_settings import EngineSettings
from moeserve.workers.engine.request import (
    AbortCause,
    FinishReason,
    InvalidRequest,
    Request,
    RequestOutput,
    SamplingParams,
    Sink,
    TokenLogprobs,
)
from moeserve.workers.engine.runner import ModelRunner
from moeserve.workers.engine.sampler import logprobs_of, sample_row
from moeserve.workers.engine.scheduler import Schedule, Scheduler
from moeserve.workers.engine.speculative import MTPSpeculator, SpeculativeRunner
from moeserve.workers.engine.text import TextStream
from moeserve.workers.model.batch import SequenceStep
from moeserve.workers.model.kv_cache import SequenceBlocks
from moeserve.workers.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineObserver:
    """Hooks for metrics; the default does nothing. Called on the engine thread."""

    def on_step(self, engine: Engine, num_tokens: int, num_preempted: int) -> None: ...

    def on_token(self, request: Request, seconds_since_previous: float, first: bool) -> None: ...

    def on_finish(self, request: Request, reason: FinishReason) -> None: ...

    def on_speculation(self, proposed: int, accepted: int) -> None:
        """One request's drafts were verified: `accepted` of the first `proposed` drafts kept."""


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        settings: EngineSettings,
        eos_token_ids: tuple[int, ...] = (),
        tokenizer: Tokenizer | None = None,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        cache_salt: bytes = b"",
    ):
        """`cache_salt` names the model revision in prefix-cache block hashes (`model_cache_salt`)."""
        self.runner = runner
        self.settings = settings
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer
        self.observer = observer or EngineObserver()
        self.clock = clock
        capacity = (runner.allocator.num_blocks - 1) * runner.block_size
        limit = settings.max_model_len or runner.max_positions
        self.speculator: MTPSpeculator | None = None
        if settings.speculative == "mtp":  # the runner must hold an MTP layer (`SpeculativeRunner`)
            if not getattr(runner, "has_mtp", False):
                raise ValueError(
                    "speculative: 'mtp' needs a model with an MTP layer (num_nextn_predict_layers >= 1)"
                )
            self.speculator = MTPSpeculator(
                cast("SpeculativeRunner", runner), settings.num_speculative_tokens
            )
            capacity -= self.speculator.lookahead  # a request alone always fits its draft slots
        self.max_model_len = min(limit, runner.max_positions, capacity)
        self.scheduler = Scheduler(settings, runner.allocator, cache_salt)
        self.requests: dict[int, Request] = {}
        self._keys = itertools.count()

    # requests in
    def check(
        self, prompt_ids: list[int], sampling: SamplingParams, prompt_field: str = "prompt_token_ids"
    ) -> None:
        """Raise InvalidRequest naming the field when the engine cannot run this request."""
        if not prompt_ids:
            raise InvalidRequest(prompt_field, "must not be empty")
        vocab = self.runner.vocab_size
        if len(prompt_ids) >= self.max_model_len:  # the size before anything proportional to it
            raise InvalidRequest(
                prompt_field,
                f"{len(prompt_ids)} tokens leave no room to generate within the max model length "
                f"{self.max_model_len}",
            )
        if not 0 <= min(prompt_ids) <= max(prompt_ids) < vocab:
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            raise InvalidRequest(prompt_field, f"token ids {bad[:5]} not below vocab size {vocab}")
        sampling.validate(vocab, self.settings.limits)
        room = self.max_model_len - len(prompt_ids)
        if sampling.max_tokens > room:
            raise InvalidRequest(
                "sampling.max_tokens",
                f"{sampling.max_tokens} new tokens after a {len(prompt_ids)}-token prompt exceed the max "
                f"model length {self.max_model_len} (at most {room})",
            )
        if sampling.stop and self.tokenizer is None:
            raise InvalidRequest("sampling.stop", "stop strings need a model with a tokenizer")

    def make_request(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        sink: Sink,
        request_id: str = "",
        deadline: float | None = None,
    ) -> Request:
        """A validated request, not yet added. Safe to call from any thread."""
        self.check(prompt_ids, sampling)
        key = next(self._keys)
        text = TextStream(self.tokenizer, sampling.stop) if self.tokenizer is not None else None
        blocks = SequenceBlocks(self.runner.block_size)
        request = Request(key, request_id or f"req-{key}", prompt_ids, sampling, sink, blocks, text, deadline)
        request.lookahead = self.speculator.lookahead if self.speculator is not None else 0
        return request

    def add(self, request: Request) -> None:
        self.requests[request.key] = request
        self.scheduler.add(request)

    def abort(self, key: int, cause: AbortCause = "cancelled", error: str = "") -> None:
        request = self.requests.get(key)
        if request is not None:
            self._finish(request, "abort", [], "", [], cause, error)

    def abort_all(self, cause: AbortCause, error: str = "") -> None:
        for key in list(self.requests):
            self.abort(key, cause, error)

    def expire(self, now: float) -> None:
        """Abort requests past their deadline."""
        for request in list(self.requests.values()):
            if request.deadline is not None and now >= request.deadline:
                self.abort(request.key, "deadline")

    # stepping
    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> None:
        self.execute(self.scheduler.schedule())

    def execute(self, plan: Schedule) -> None:
        """Run one scheduled step: forward, sample, stream. (`step` = schedule + execute.)"""
        if self.speculator is not None:
            self._execute_speculative(self.speculator, plan)
        elif plan.chunks:
            steps = [
                SequenceStep(
                    r.token_slice(r.num_computed, r.num_computed + n), r.num_computed, r.blocks.blocks
                )
                for r, n in plan.chunks
            ]
            logits = self.runner.step(steps)  # [S, V]
            rows: list[int] = []
            ready: list[Request] = []
            for row, (request, n) in enumerate(plan.chunks):
                request.blocks.num_tokens += n
                if request.num_uncomputed == 0:  # prompt (and output so far) all cached: sample
                    rows.append(row)
                    ready.append(request)
            if ready:
                picked = logits[rows]  # [S', V]
                greedy = picked.argmax(dim=-1).tolist()  # [S']; one batched argmax for greedy rows
                for i, request in enumerate(ready):
                    self._advance(request, picked[i], greedy[i])
        self.observer.on_step(self, plan.num_tokens, len(plan.preempted))

    def _execute_speculative(self, speculator: MTPSpeculator, plan: Schedule) -> None:
        """The step with MTP drafts (`speculative.py`): verify, append what was accepted, draft."""
        plans, steps = speculator.plan(plan.chunks, plan.preempted)
        if not steps:
            return
        runner = speculator.runner
        hidden = runner.step_hidden(steps)  # [T, D]
        logits = speculator.verify(plans, hidden)
        for cp in plans:
            if cp.error:
                self._fail(cp.request, cp.error)
                continue
            if cp.drafts and cp.tokens:
                self.observer.on_speculation(len(cp.drafts), len(cp.tokens) - 1)
            for token, row in zip(cp.tokens, cp.rows, strict=True):
                if cp.request.key not in self.requests:
                    break  # finished on an earlier token of this step: the rest is dropped
                assert logits is not None
                self._emit(cp.request, token, logits[row])
        room = {
            cp.request.key: min(
                cp.request.sampling.max_tokens - len(cp.request.output_ids),
                self.max_model_len - cp.request.num_tokens,
            )
            for cp in plans
            if cp.request.key in self.requests
        }
        speculator.propose(plans, hidden, room)

    def _emit(self, request: Request, token: int, logits: torch.Tensor) -> None:
        """Append a verified token (its logprobs from the target logits [V]); failures as `_advance`."""
        try:
            sampling = request.sampling
            lp = logprobs_of(logits, token, sampling.logprobs) if sampling.logprobs else None
            self._append(request, token, lp)
        except Exception as e:  # noqa: BLE001 - isolated to the request; logged with its traceback
            log.exception("request %s failed; the engine serves on", request.request_id)
            self._fail(request, f"{type(e).__name__}: {str(e)[:200]}")

    def _fail(self, request: Request, error: str) -> None:
        if request.key in self.requests:
            self._finish(request, "abort", [], "", [], "error", error)

    def _advance(self, request: Request, logits: torch.Tensor, greedy_token: int) -> None:
        """Sample, detokenize and match stops for one request. Whatever fails there fails this
        request alone (abort cause "error"): the step's forward is done, so the engine and, on an
        attention rank, the lockstep with the other ranks go on."""
        try:
            sampling = request.sampling
            token = greedy_token if sampling.greedy else sample_row(logits, sampling, request.generator)
            lp = logprobs_of(logits, token, sampling.logprobs) if sampling.logprobs else None
            self._append(request, token, lp)
        except Exception as e:  # noqa: BLE001 - isolated to the request; logged with its traceback
            log.exception("request %s failed; the engine serves on", request.request_id)
            if request.key in self.requests:
                self._finish(request, "abort", [], "", [], "error", f"{type(e).__name__}: {str(e)[:200]}")

    def _append(self, request: Request, token: int, lp: TokenLogprobs | None) -> None:
        now = self.clock()
        first = not request.output_ids
        since = now - (request.arrival if first else (request.last_token_time or now))
        request.last_token_time = now
        request.output_ids.append(token)
        self.observer.on_token(request, since, first)
        logprobs = [lp] if lp is not None else []
        sampling = request.sampling
        reason: FinishReason | None = None
        text = ""
        if token in request.stop_token_ids or (not sampling.ignore_eos and token in self.eos_token_ids):
            reason = "stop"  # the id is returned, its text is not
        elif request.text is not None:
            text, stopped = request.text.add(token)
            if stopped:  # text already cut before the stop string; nothing more to release
                self._finish(request, "stop", [token], text, logprobs)
                return
        if reason is None and (
            len(request.output_ids) >= sampling.max_tokens or request.num_tokens >= self.max_model_len
        ):
            reason = "length"
        if reason is None:
            request.sink(RequestOutput(request.request_id, [token], text, logprobs=logprobs))
            return
        if request.text is not None:
            text += request.text.flush()
        self._finish(request, reason, [token], text, logprobs)

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        tokens: list[int],
        text: str,
        logprobs: list[TokenLogprobs],
        cause: AbortCause | None = None,
        error: str = "",
    ) -> None:
        self.scheduler.remove(request)
        del self.requests[request.key]
        self.observer.on_finish(request, reason)
        request.sink(
            RequestOutput(
                request.request_id,
                tokens,
                text,
                finish_reason=reason,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=len(request.output_ids),
                logprobs=logprobs,
                abort_cause=cause,
                error=error,
                cached_prompt_tokens=request.num_cached_prompt_tokens,
            )
        )
