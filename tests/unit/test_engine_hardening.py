"""No request can stop the engine: numerically safe sampling at every temperature the API accepts,
one request's failure in sampling or text isolated to it, size limits named by field, and a fuzz
over `SamplingParams` and the stop fields after which the engine loop still serves exactly."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
import torch
from builders import ChecksumRunner, train_byte_level_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeserve.engine_settings import RequestLimits
from moeserve.workers.engine import (
    Engine,
    EngineLoop,
    EngineSettings,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
)
from moeserve.workers.engine.sampler import MIN_TEMPERATURE, sample
from moeserve.workers.model.tokenizer import Tokenizer

pytestmark = pytest.mark.unit
F32_TINY = 1.401298464324817e-45  # the smallest positive float32, what the API can carry
TEMPERATURES = [F32_TINY, 1e-38, 1e-30, 1e-12, MIN_TEMPERATURE / 10, MIN_TEMPERATURE, 0.3, 1.0, 7.0]
TEMPERATURES += [1e4, 1e30, 3.4028234663852886e38, 1e300]


def logit_rows(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ties = torch.zeros(vocab)
    ties[[4, 9]] = 5.0  # two best tokens, exactly tied
    return {
        "normal": torch.randn(vocab, generator=g),
        "huge": torch.randn(vocab, generator=g) * 3e4,  # fp32 logits far from 0
        "offset": torch.randn(vocab, generator=g) + 1e6,
        "ties": ties,
        "flat": torch.full((vocab,), -3.0),
        "one_finite": torch.full((vocab,), float("-inf")).index_fill_(0, torch.tensor([17]), 2.0),
    }


@pytest.mark.parametrize("top_k", [0, 1, 2, 49, 50, 10**9])
@pytest.mark.parametrize("top_p", [F32_TINY, 1e-7, 0.5, 0.999999, 1.0])
def test_sampling_at_extreme_settings_gives_a_valid_token(top_k: int, top_p: float) -> None:
    vocab = 50
    rows = logit_rows(vocab)
    for name, row in rows.items():
        for t in TEMPERATURES:
            params = SamplingParams(temperature=t, top_k=top_k, top_p=top_p, seed=1)
            params.validate(vocab)
            token = sample(row[None], [params], [torch.Generator().manual_seed(7)])[0]
            assert 0 <= token < vocab, (name, t)
            assert math.isfinite(row[token]), (name, t)  # never a token the model ruled out
            best = float(row.max())
            if t <= MIN_TEMPERATURE or top_k == 1 or (top_p <= 1e-7 and t < 10):  # in effect greedy
                assert row[token] == best, (name, t, top_k, top_p)


def test_tiny_temperatures_split_exact_ties_at_random() -> None:
    row = logit_rows(50)["ties"]
    picks = {
        sample(row[None], [SamplingParams(temperature=1e-38)], [torch.Generator().manual_seed(s)])[0]
        for s in range(40)
    }
    assert picks == {4, 9}


class Collector:
    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.lock = threading.Lock()
        self.finished = threading.Condition(self.lock)

    def sink(self, out: RequestOutput) -> None:
        with self.lock:
            self.outputs.setdefault(out.request_id, []).append(out)
            self.finished.notify_all()

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.token_ids]

    def last(self, rid: str) -> RequestOutput:
        return self.outputs[rid][-1]

    def wait_finished(self, rid: str, timeout: float = 30.0) -> RequestOutput:
        with self.lock:
            done = self.finished.wait_for(
                lambda: bool(self.outputs.get(rid)) and self.outputs[rid][-1].finished, timeout
            )
        assert done, f"{rid} did not finish within {timeout} s"
        return self.last(rid)


class PoisonedRunner(ChecksumRunner):
    """NaN logits for every sequence whose context starts with `POISON` (what a broken kernel or a
    bad weight might give one row)."""

    POISON = 99

    def step(self, steps: list[Any]) -> torch.Tensor:
        logits = super().step(steps)
        for row, s in enumerate(steps):
            bs = self.block_size
            if s.block_table and self.store[s.block_table[0] * bs] == self.POISON:
                logits[row] = float("nan")
        return logits


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(train_byte_level_tokenizer())  # type: ignore[arg-type]


def engine_with(tokenizer: Tokenizer | None, runner: ChecksumRunner | None = None) -> Engine:
    runner = runner or ChecksumRunner(
        256, block_size=4, vocab_size=tokenizer.vocab_size if tokenizer else 101
    )
    settings = EngineSettings(block_size=4, max_model_len=128, limits=RequestLimits(max_stop_strings=64))
    return Engine(runner, settings, tokenizer=tokenizer)


def run_all(engine: Engine, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not engine.has_work:
            return
        engine.step()
    raise AssertionError("engine did not finish")


def test_a_failure_while_sampling_one_request_fails_that_request_alone() -> None:
    runner = PoisonedRunner(256, block_size=4)
    engine = engine_with(None, runner)
    sink = Collector()
    jobs = {"a": [5, 6, 7], "poisoned": [PoisonedRunner.POISON, 3], "b": [8]}
    for rid, prompt in jobs.items():
        engine.add(
            engine.make_request(prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=2), sink.sink, rid)
        )
    run_all(engine)
    bad = sink.last("poisoned")
    assert bad.finish_reason == "abort" and bad.abort_cause == "error" and "RuntimeError" in bad.error
    for rid in ("a", "b"):  # the checksum runner's logits are one-hot: sampling equals the reference
        assert sink.tokens(rid) == runner.reference(jobs[rid], 6) and sink.last(rid).finish_reason == "length"
    assert runner.allocator.num_used == 0 and not engine.requests


def test_a_failure_while_matching_stops_fails_that_request_alone(tokenizer: Tokenizer) -> None:
    engine = engine_with(tokenizer)
    sink = Collector()
    victim = engine.make_request(
        [5, 6], SamplingParams(max_tokens=5, temperature=0.0, stop=("zz",)), sink.sink, "v"
    )
    assert victim.text is not None

    def broken(token: int) -> tuple[str, bool]:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    victim.text.add = broken  # type: ignore[method-assign]
    engine.add(victim)
    engine.add(engine.make_request([7, 8], SamplingParams(max_tokens=5, temperature=0.0), sink.sink, "ok"))
    run_all(engine)
    assert sink.last("v").abort_cause == "error" and "UnicodeDecodeError" in sink.last("v").error
    assert sink.last("ok").finish_reason == "length" and len(sink.tokens("ok")) == 5
    assert engine.runner.allocator.num_used == 0


@pytest.mark.parametrize(
    ("sampling", "field", "limits"),
    [
        (SamplingParams(stop=("a",) * 3), "sampling.stop", RequestLimits(max_stop_strings=2)),
        (SamplingParams(stop=("ab", "日本")), "sampling.stop", RequestLimits(max_stop_bytes=7)),
        (
            SamplingParams(stop_token_ids=(1, 2, 3)),
            "sampling.stop_token_ids",
            RequestLimits(max_stop_token_ids=2),
        ),
    ],
)
def test_stop_field_sizes_are_limited_by_field(
    sampling: SamplingParams, field: str, limits: RequestLimits
) -> None:
    sampling.validate(1000)  # within the default limits
    with pytest.raises(InvalidRequest) as info:
        sampling.validate(1000, limits)
    assert info.value.field == field and str(info.value).startswith(field)


def test_a_prompt_over_the_max_model_len_is_refused_before_its_ids_are_scanned() -> None:
    engine = engine_with(None)
    with pytest.raises(InvalidRequest, match="prompt_token_ids: 1000000 tokens"):
        engine.check([10**9] * 1_000_000, SamplingParams())


def mostly(valid: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` three times in four: most examples get through validation and run."""
    return st.one_of(valid, valid, valid, other)


extremes = st.sampled_from([0.0, F32_TINY, 1e-38, 1e-300, 5e-324, MIN_TEMPERATURE, 1.0, 3.4e38, 1e308])
sampling_params = st.builds(
    SamplingParams,
    max_tokens=mostly(st.integers(1, 12), st.integers(-2, 0)),
    temperature=mostly(st.one_of(extremes, st.floats(0.0, 2.0)), st.floats()),
    top_p=mostly(
        st.one_of(extremes.filter(lambda v: 0 < v <= 1), st.floats(0.0, 1.0, exclude_min=True)), st.floats()
    ),
    top_k=mostly(st.one_of(st.integers(0, 400), st.just(2**31 - 1)), st.integers(-3, -1)),
    seed=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
    stop=mostly(
        st.lists(st.text(min_size=1, max_size=6), max_size=70), st.lists(st.text(max_size=2), max_size=3)
    ).map(tuple),
    stop_token_ids=mostly(
        st.lists(st.integers(0, 383), max_size=20), st.lists(st.integers(-1, 400), max_size=3)
    ).map(tuple),
    ignore_eos=st.booleans(),
    logprobs=mostly(st.integers(0, 20), st.integers(-1, 25)),
)


def test_fuzzed_sampling_and_stop_fields_never_stop_the_engine(tokenizer: Tokenizer) -> None:
    runner = ChecksumRunner(256, block_size=4, vocab_size=tokenizer.vocab_size)
    engine = Engine(
        runner,
        EngineSettings(block_size=4, max_model_len=64, limits=RequestLimits(max_stop_strings=64)),
        eos_token_ids=(1,),
        tokenizer=tokenizer,
    )
    loop = EngineLoop(engine).start()
    sink = Collector()
    seen = {"served": 0, "refused": 0}
    reasons: dict[str, int] = {}

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(sampling=sampling_params, prompt=st.lists(st.integers(0, 383), min_size=1, max_size=20))
    def one(sampling: SamplingParams, prompt: list[int]) -> None:
        rid = f"f{sum(seen.values())}"
        try:
            loop.submit(prompt, sampling, sink.sink, rid)
        except InvalidRequest as e:
            seen["refused"] += 1
            reasons[e.field] = reasons.get(e.field, 0) + 1
            return
        out = sink.wait_finished(rid)
        assert out.finish_reason in ("stop", "length"), out  # never "abort" with an error
        assert all(0 <= t < tokenizer.vocab_size for t in sink.tokens(rid))
        seen["served"] += 1

    try:
        one()
        assert loop.alive and seen["served"] >= 10 and seen["refused"] >= 5, (seen, reasons)
        canary = [5, 6, 7]
        loop.submit(
            canary, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), sink.sink, "canary"
        )
        assert sink.wait_finished("canary").finish_reason == "length"
        assert sink.tokens("canary") == runner.reference(canary, 8)
        assert runner.allocator.num_used == 0
    finally:
        loop.stop()
