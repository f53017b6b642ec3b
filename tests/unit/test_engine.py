"""Engine behaviour over a model-free runner: continuous batching, chunked prefill, preemption,
stopping rules, aborts, deadlines and the engine loop's queue bound and failure handling."""

from __future__ import annotations

import random
import threading

import pytest
from builders import ChecksumRunner

from moeserve.workers.engine import (
    Engine,
    EngineFailed,
    EngineLoop,
    EngineSettings,
    InvalidRequest,
    QueueFull,
    RequestOutput,
    SamplingParams,
)

pytestmark = pytest.mark.unit
GREEDY = SamplingParams(temperature=0.0)


class Collector:
    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.done = threading.Event()
        self.expected = 0

    def sink(self, out: RequestOutput) -> None:
        self.outputs.setdefault(out.request_id, []).append(out)
        if out.finished and sum(o[-1].finished for o in self.outputs.values()) == self.expected:
            self.done.set()

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.token_ids]

    def last(self, rid: str) -> RequestOutput:
        return self.outputs[rid][-1]


def make_engine(
    num_blocks: int = 256, eos: tuple[int, ...] = (), **limits: int
) -> tuple[Engine, ChecksumRunner]:
    runner = ChecksumRunner(num_blocks, block_size=4)
    return Engine(runner, EngineSettings(block_size=4, **limits), eos_token_ids=eos), runner


def run_to_completion(engine: Engine, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not engine.has_work:
            return
        engine.step()
    raise AssertionError("engine did not finish")


def submit(engine: Engine, sink: Collector, rid: str, prompt: list[int], sampling: SamplingParams) -> int:
    request = engine.make_request(prompt, sampling, sink.sink, rid)
    engine.add(request)
    return request.key


def test_requests_joining_and_leaving_between_steps_match_reference() -> None:
    engine, runner = make_engine(max_num_batched_tokens=16, max_num_seqs=8)
    rng = random.Random(0)
    sink = Collector()
    jobs = {
        f"r{i}": ([rng.randrange(100) for _ in range(rng.randint(1, 40))], rng.randint(1, 20))
        for i in range(24)
    }
    pending = list(jobs.items())
    while pending or engine.has_work:
        for _ in range(rng.randint(0, 3)):  # a few arrive before each step
            if pending:
                rid, (prompt, n) = pending.pop()
                submit(engine, sink, rid, prompt, SamplingParams(max_tokens=n, temperature=0.0))
        engine.step()
    for rid, (prompt, n) in jobs.items():
        assert sink.tokens(rid) == runner.reference(prompt, n), rid
        assert sink.last(rid).finish_reason == "length"
        assert sink.last(rid).completion_tokens == n and sink.last(rid).prompt_tokens == len(prompt)
    assert max(runner.step_tokens) <= 16
    assert engine.runner.allocator.num_used == 0


def test_long_prompt_prefills_in_chunks_under_the_budget() -> None:
    engine, runner = make_engine(max_num_batched_tokens=8)
    sink = Collector()
    prompt = list(range(1, 30))
    submit(engine, sink, "long", prompt, SamplingParams(max_tokens=3, temperature=0.0))
    run_to_completion(engine)
    assert runner.step_tokens == [8, 8, 8, 5, 1, 1]
    assert sink.tokens("long") == runner.reference(prompt, 3)
    assert len(sink.outputs["long"]) == 3  # nothing streamed while prefilling


def test_preemption_by_recompute_keeps_outputs_and_frees_every_block() -> None:
    # 12 usable blocks of 4 = 48 tokens for 8 requests needing up to 40 each: preemption is certain.
    engine, runner = make_engine(num_blocks=13, max_num_batched_tokens=32, max_model_len=48)
    rng = random.Random(1)
    sink = Collector()
    jobs = {
        f"r{i}": ([rng.randrange(100) for _ in range(rng.randint(5, 20))], rng.randint(10, 20))
        for i in range(8)
    }
    requests = {}
    for rid, (prompt, n) in jobs.items():
        request = engine.make_request(prompt, SamplingParams(max_tokens=n, temperature=0.0), sink.sink, rid)
        requests[rid] = request
        engine.add(request)
    run_to_completion(engine)
    assert sum(r.num_preemptions for r in requests.values()) > 0
    for rid, (prompt, n) in jobs.items():
        assert sink.tokens(rid) == runner.reference(prompt, n), rid
    assert engine.runner.allocator.num_used == 0


def test_admission_waits_for_free_blocks() -> None:
    engine, _ = make_engine(num_blocks=5, max_model_len=16)  # 4 usable blocks = 16 tokens
    sink = Collector()
    submit(engine, sink, "a", list(range(12)), SamplingParams(max_tokens=2, temperature=0.0))
    submit(engine, sink, "b", list(range(12)), SamplingParams(max_tokens=2, temperature=0.0))
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == ["a"]
    assert [r.request_id for r in engine.scheduler.waiting] == ["b"]
    run_to_completion(engine)
    assert sink.last("a").finish_reason == sink.last("b").finish_reason == "length"


def test_stop_token_ids_eos_and_ignore_eos() -> None:
    engine, runner = make_engine()
    prompt = [3, 1, 4, 1, 5]
    ref = runner.reference(prompt, 12)
    sink = Collector()
    submit(
        engine,
        sink,
        "stop-id",
        prompt,
        SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(ref[3],)),
    )
    run_to_completion(engine)
    first = ref.index(ref[3])
    assert sink.tokens("stop-id") == ref[: first + 1] and sink.last("stop-id").finish_reason == "stop"

    engine, runner = make_engine(eos=(ref[2],))
    eos_at = ref.index(ref[2])
    submit(engine, sink, "eos", prompt, SamplingParams(max_tokens=12, temperature=0.0))
    submit(engine, sink, "ignore", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    run_to_completion(engine)
    assert sink.tokens("eos") == ref[: eos_at + 1] and sink.last("eos").finish_reason == "stop"
    assert sink.tokens("ignore") == ref and sink.last("ignore").finish_reason == "length"


def test_abort_frees_blocks_at_once_and_reports_abort() -> None:
    engine, _ = make_engine()
    sink = Collector()
    key = submit(engine, sink, "x", list(range(30)), SamplingParams(max_tokens=50, temperature=0.0))
    for _ in range(3):
        engine.step()
    assert engine.runner.allocator.num_used > 0
    engine.abort(key)
    assert engine.runner.allocator.num_used == 0 and not engine.has_work
    last = sink.last("x")
    assert last.finish_reason == "abort" and last.abort_cause == "cancelled"


def test_deadline_expiry_aborts_waiting_and_running_requests() -> None:
    engine, _ = make_engine()
    sink = Collector()
    r = engine.make_request([1, 2], SamplingParams(max_tokens=50), sink.sink, "late", deadline=10.0)
    engine.add(r)
    engine.step()
    engine.expire(now=9.0)
    assert engine.has_work
    engine.expire(now=10.0)
    assert not engine.has_work and sink.last("late").abort_cause == "deadline"
    assert engine.runner.allocator.num_used == 0


@pytest.mark.parametrize(
    "prompt, sampling, field",
    [
        ([], GREEDY, "prompt_token_ids"),
        ([101], GREEDY, "prompt_token_ids"),
        ([1] * 64, GREEDY, "prompt_token_ids"),  # fills the 64-token max model length
        ([1], SamplingParams(max_tokens=0), "sampling.max_tokens"),
        ([1] * 10, SamplingParams(max_tokens=55), "sampling.max_tokens"),
        ([1], SamplingParams(temperature=-0.1), "sampling.temperature"),
        ([1], SamplingParams(temperature=float("nan")), "sampling.temperature"),
        ([1], SamplingParams(top_p=0.0), "sampling.top_p"),
        ([1], SamplingParams(top_p=1.01), "sampling.top_p"),
        ([1], SamplingParams(top_k=-1), "sampling.top_k"),
        ([1], SamplingParams(logprobs=21), "sampling.logprobs"),
        ([1], SamplingParams(stop_token_ids=(101,)), "sampling.stop_token_ids"),
        ([1], SamplingParams(stop=("x",)), "sampling.stop"),  # no tokenizer
    ],
)
def test_invalid_requests_name_the_field(prompt: list[int], sampling: SamplingParams, field: str) -> None:
    engine, _ = make_engine(max_model_len=64)
    with pytest.raises(InvalidRequest) as info:
        engine.check(prompt, sampling)
    assert info.value.field == field and str(info.value).startswith(field)


def test_loop_bounds_the_waiting_queue() -> None:
    engine, _ = make_engine(max_num_seqs=1, max_waiting=2)
    loop = EngineLoop(engine)  # not started: nothing leaves the queue
    sink = Collector()
    loop.submit([1], GREEDY, sink.sink)
    loop.submit([1], GREEDY, sink.sink)
    with pytest.raises(QueueFull):
        loop.submit([1], GREEDY, sink.sink)


def test_loop_serves_then_stops_aborting_what_is_left() -> None:
    engine, runner = make_engine()
    loop = EngineLoop(engine).start()
    sink = Collector()
    sink.expected = 2
    loop.submit([5, 6], SamplingParams(max_tokens=4, temperature=0.0), sink.sink, "quick")
    loop.submit([5, 6], SamplingParams(max_tokens=4, temperature=0.0), sink.sink, "quick2")
    assert sink.done.wait(10)
    assert sink.tokens("quick") == runner.reference([5, 6], 4)
    sink.done.clear()
    sink.expected = 3
    loop.submit([7], SamplingParams(max_tokens=400, temperature=0.0), sink.sink, "long")
    loop.stop()
    assert sink.done.wait(10)
    assert sink.last("long").abort_cause == "stopping" and engine.runner.allocator.num_used == 0


def test_a_failing_step_fails_every_request_and_the_loop() -> None:
    engine, runner = make_engine()
    runner.fail_after = 2
    failures: list[BaseException] = []
    loop = EngineLoop(engine, on_failure=failures.append).start()
    sink = Collector()
    sink.expected = 1
    loop.submit([1, 2, 3], SamplingParams(max_tokens=10, temperature=0.0), sink.sink, "doomed")
    assert sink.done.wait(10)
    last = sink.last("doomed")
    assert last.abort_cause == "failed" and "injected" in last.error
    loop.stop()
    assert failures and not loop.alive
    with pytest.raises(EngineFailed):
        loop.submit([1], GREEDY, sink.sink)


def test_queue_count_is_current_before_outputs_go_out() -> None:
    # A client that reacts to its first token by sending another request must not see a stale count.
    engine, _ = make_engine(max_num_seqs=1, max_waiting=1)
    loop = EngineLoop(engine)
    sink = Collector()
    sink.expected = 2
    errors: list[BaseException] = []

    def react(out: RequestOutput) -> None:
        sink.sink(out)
        if out.request_id == "a" and len(sink.outputs["a"]) == 1:
            try:
                loop.submit([2], SamplingParams(max_tokens=2, temperature=0.0), sink.sink, "b")
            except QueueFull as e:
                errors.append(e)

    loop.submit([1], SamplingParams(max_tokens=3, temperature=0.0), react, "a")
    loop.start()
    assert sink.done.wait(10)
    loop.stop()
    assert errors == [] and sink.last("b").finish_reason == "length"
