"""Prefix caching in the engine: reuse of cached leading blocks, the last prompt token always
computed, eviction, preemption, aborts and truncation; fp32 greedy outputs of a real (tiny, random)
model identical with and without the cache."""

from __future__ import annotations

import random

import pytest
import torch
from builders import COMMON, ChecksumRunner

from moeserve.workers.engine import Engine, EngineSettings, RequestOutput, SamplingParams
from moeserve.workers.engine.request import Request
from moeserve.workers.engine.runner import LocalModelRunner
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.kv_cache import BlockAllocator, SequenceBlocks, chain_hashes, root_hash
from moeserve.workers.model.random_checkpoint import init_random

pytestmark = pytest.mark.unit
BS = 4


class Sink:
    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}

    def __call__(self, out: RequestOutput) -> None:
        self.outputs.setdefault(out.request_id, []).append(out)

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.token_ids]

    def last(self, rid: str) -> RequestOutput:
        return self.outputs[rid][-1]


def checksum_engine(num_blocks: int = 64, caching: bool = True, **limits: int) -> Engine:
    settings = EngineSettings(block_size=BS, prefix_caching=caching, **limits)
    return Engine(ChecksumRunner(num_blocks, block_size=BS), settings)


def add(engine: Engine, sink: Sink, rid: str, prompt: list[int], max_tokens: int = 3) -> Request:
    request = engine.make_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), sink, rid)
    engine.add(request)
    return request


def drain(engine: Engine, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not engine.has_work:
            return
        engine.step()
    raise AssertionError("engine did not finish")


def test_a_repeated_prompt_reuses_its_full_blocks_but_computes_its_last_token() -> None:
    engine = checksum_engine()
    runner = engine.runner
    assert isinstance(runner, ChecksumRunner)
    sink = Sink()
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks and one token more
    add(engine, sink, "a", prompt)
    drain(engine)
    fed_first = sum(runner.step_tokens)
    add(engine, sink, "b", prompt)
    drain(engine)
    assert sum(runner.step_tokens) - fed_first == 1 + 2  # the last prompt token, then 2 decode tokens
    assert sink.tokens("b") == sink.tokens("a") == runner.reference(prompt, 3)
    assert sink.last("a").cached_prompt_tokens == 0
    assert sink.last("b").cached_prompt_tokens == 12
    assert engine.scheduler.prefix.queried_tokens == 26 and engine.scheduler.prefix.hit_tokens == 12


def test_a_block_aligned_prompt_recomputes_its_last_block() -> None:
    engine = checksum_engine()
    sink = Sink()
    prompt = list(range(1, 13))  # exactly 3 blocks: the third holds the last token, so it is computed
    add(engine, sink, "a", prompt)
    drain(engine)
    add(engine, sink, "b", prompt)
    drain(engine)
    assert sink.last("b").cached_prompt_tokens == 8
    assert sink.tokens("b") == sink.tokens("a")


def test_prompts_sharing_prefixes_of_several_lengths_match_the_reference() -> None:
    engine = checksum_engine(num_blocks=40, max_num_batched_tokens=16, max_num_seqs=6)
    runner = engine.runner
    assert isinstance(runner, ChecksumRunner)
    rng = random.Random(0)
    system = [rng.randrange(1, 100) for _ in range(30)]
    jobs = {}
    for i in range(30):
        shared = system[: rng.choice([0, 3, 4, 8, 13, 30])]
        jobs[f"r{i}"] = (
            shared + [rng.randrange(1, 100) for _ in range(rng.randint(1, 9))],
            rng.randint(1, 12),
        )
    sink = Sink()
    pending = list(jobs.items())
    while pending or engine.has_work:
        for _ in range(rng.randint(0, 2)):
            if pending:
                rid, (prompt, n) = pending.pop()
                add(engine, sink, rid, prompt, n)
        engine.step()
    for rid, (prompt, n) in jobs.items():
        assert sink.tokens(rid) == runner.reference(prompt, n), rid
    hit = sum(sink.last(rid).cached_prompt_tokens for rid in jobs)
    assert hit == engine.scheduler.prefix.hit_tokens > 0
    assert engine.runner.allocator.num_used == 0
    assert engine.runner.allocator.num_cached > 0  # finished requests' blocks stay cached


def test_eviction_and_preemption_keep_outputs_exact() -> None:
    # 10 usable blocks of 4 tokens for 8 requests of up to 34 tokens: blocks are evicted and
    # requests preempted all the time.
    engine = checksum_engine(num_blocks=11, max_num_batched_tokens=12, max_model_len=40)
    runner = engine.runner
    assert isinstance(runner, ChecksumRunner)
    rng = random.Random(3)
    prefix = [rng.randrange(1, 100) for _ in range(9)]
    jobs = {
        f"r{i}": (prefix + [rng.randrange(1, 100) for _ in range(rng.randint(1, 12))], 14) for i in range(8)
    }
    sink = Sink()
    requests = [add(engine, sink, rid, prompt, n) for rid, (prompt, n) in jobs.items()]
    drain(engine)
    assert sum(r.num_preemptions for r in requests) > 0
    assert engine.runner.allocator.evictions > 0
    for rid, (prompt, n) in jobs.items():
        assert sink.tokens(rid) == runner.reference(prompt, n), rid
    assert engine.runner.allocator.num_used == 0


def test_a_preempted_request_finds_its_own_blocks_again() -> None:
    engine = checksum_engine(num_blocks=64)
    sink = Sink()
    request = add(engine, sink, "a", list(range(1, 20)), max_tokens=8)
    for _ in range(4):
        engine.step()
    computed = request.num_computed
    assert computed >= 19
    scheduler = engine.scheduler
    scheduler.running.remove(request)  # preempt it the way the scheduler does
    scheduler.prefix.commit(request)
    request.blocks.release(engine.runner.allocator)
    scheduler.waiting.appendleft(request)
    plan = scheduler.schedule()
    (chunk,) = plan.chunks
    assert chunk[0] is request and request.num_computed == (request.num_tokens - 1) // BS * BS
    engine.execute(plan)
    drain(engine)
    runner = engine.runner
    assert isinstance(runner, ChecksumRunner)
    assert sink.tokens("a") == runner.reference(list(range(1, 20)), 8)


def test_a_prompt_being_prefilled_by_another_request_is_reused_as_far_as_computed() -> None:
    engine = checksum_engine(max_num_batched_tokens=8)
    runner = engine.runner
    assert isinstance(runner, ChecksumRunner)
    sink = Sink()
    prompt = list(range(1, 31))  # 30 tokens: 4 chunks of at most 8
    add(engine, sink, "a", prompt)
    engine.step()
    engine.step()  # "a" has 16 tokens computed, 4 blocks; its chunks go on
    add(engine, sink, "b", prompt)
    drain(engine)
    assert 16 <= sink.last("b").cached_prompt_tokens < 30
    assert sink.tokens("b") == sink.tokens("a") == runner.reference(prompt, 3)


def test_cached_free_blocks_count_as_free_for_admission() -> None:
    engine = checksum_engine(num_blocks=5, max_model_len=16)  # 4 usable blocks
    sink = Sink()
    add(engine, sink, "a", list(range(1, 15)), max_tokens=2)
    drain(engine)
    allocator = engine.runner.allocator
    assert allocator.num_cached == 3 and allocator.num_free == 4
    add(engine, sink, "b", list(range(50, 64)), max_tokens=2)  # different prompt: evicts them
    drain(engine)
    assert sink.last("b").finish_reason == "length"
    assert allocator.evictions == 3


def test_an_abort_mid_prefill_leaves_only_whole_computed_blocks_cached() -> None:
    engine = checksum_engine(max_num_batched_tokens=6)
    sink = Sink()
    prompt = list(range(1, 30))
    request = add(engine, sink, "a", prompt)
    engine.step()  # 6 tokens computed: one full block
    engine.abort(request.key)
    assert engine.runner.allocator.num_cached == 1 and engine.runner.allocator.num_used == 0
    add(engine, sink, "b", prompt)
    drain(engine)
    assert sink.last("b").cached_prompt_tokens == 4
    runner = engine.runner
    assert isinstance(runner, ChecksumRunner)
    assert sink.tokens("b") == runner.reference(prompt, 3)


def test_without_prefix_caching_nothing_is_reused() -> None:
    engine = checksum_engine(caching=False)
    sink = Sink()
    for rid in ("a", "b"):
        add(engine, sink, rid, list(range(1, 14)))
        drain(engine)
    assert sink.last("b").cached_prompt_tokens == 0 and engine.runner.allocator.num_cached == 0


def test_truncate_never_writes_into_a_registered_block() -> None:
    allocator = BlockAllocator(16)
    root = root_hash(b"m")
    tokens = list(range(10))
    seq = SequenceBlocks(BS)
    seq.reserve(allocator, 10)
    seq.num_tokens = 10
    seq.commit(allocator, tokens, root)  # blocks 0 and 1 registered; block 2 is partial
    assert seq.num_committed == 2 and seq.hashes == chain_hashes(tokens, BS, root)
    assert seq.truncate(9, allocator) == 9 and len(seq.blocks) == 3  # inside the private partial block
    assert seq.truncate(8, allocator) == 8 and len(seq.blocks) == 2  # at a block edge: the tail goes
    assert allocator.num_used == 2
    assert seq.truncate(6, allocator) == 4  # inside registered block 1: let go, keep block 0 only
    assert len(seq.blocks) == 1 and seq.num_committed == 1 and len(seq.hashes) == 1
    assert allocator.num_used == 1 and allocator.num_cached == 2  # block 1 stays cached for others


# fp32 greedy, a real model: the same tokens with and without the cache
def tiny_model() -> torch.nn.Module:
    config = ModelConfig.from_dict(
        dict(COMMON, model_type="deepseek_v2", q_lora_rank=None, n_shared_experts=1, first_k_dense_replace=1)
    )
    return init_random(config, seed=0, std=0.08)


def run_model(
    caching: bool, jobs: dict[str, tuple[list[int], int]], arrivals: list[list[str]]
) -> tuple[dict[str, list[int]], dict[str, int], int]:
    model = tiny_model()
    settings = EngineSettings(
        block_size=BS,
        kv_cache_tokens=14 * BS,
        max_num_batched_tokens=24,
        max_num_seqs=4,
        prefix_caching=caching,
    )
    engine = Engine(LocalModelRunner(model, settings.num_blocks, BS), settings)  # type: ignore[arg-type]
    sink = Sink()
    requests = []
    for wave in arrivals:
        for rid in wave:
            prompt, n = jobs[rid]
            requests.append(add(engine, sink, rid, prompt, n))
        for _ in range(3):
            if engine.has_work:
                engine.step()
    drain(engine)
    tokens = {rid: sink.tokens(rid) for rid in jobs}
    cached = {rid: sink.last(rid).cached_prompt_tokens for rid in jobs}
    return tokens, cached, sum(r.num_preemptions for r in requests)


def test_fp32_greedy_outputs_identical_with_and_without_prefix_caching() -> None:
    torch.manual_seed(0)
    rng = random.Random(7)
    system = [rng.randrange(2, 256) for _ in range(21)]
    jobs: dict[str, tuple[list[int], int]] = {}
    for i, length in enumerate([0, 3, 4, 8, 9, 16, 21, 21, 12, 4]):  # aligned and not, and none
        jobs[f"r{i}"] = (system[:length] + [rng.randrange(2, 256) for _ in range(rng.randint(1, 6))], 10)
    arrivals = [["r0", "r6"], ["r1", "r2", "r7"], ["r3", "r4"], ["r5", "r8", "r9"]]
    with torch.inference_mode():
        plain, none_cached, _ = run_model(False, jobs, arrivals)
        cached_tokens, cached, preemptions = run_model(True, jobs, arrivals)
    assert cached_tokens == plain
    assert not any(none_cached.values())
    assert sum(cached.values()) >= 40  # the shared prefixes were reused
    assert preemptions > 0  # 14 blocks for up to 4 requests of up to 37 tokens
