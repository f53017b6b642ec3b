"""MTP speculative decoding in the engine: greedy output identical to plain decoding, sampled output
with the model's own distribution (chi-square against the exact distribution), the verification rules.

The models are tiny random checkpoints with an MTP layer (fp32), so drafts are often rejected and
every path (rejection, partial acceptance, the bonus token) runs. The chi-square tests are
deterministic: every request has its own seed, so they cannot flake; their significance level is
ALPHA = 0.001 and a control with the wrong distribution shows that they can fail.
"""

from __future__ import annotations

from typing import cast

import pytest
import torch

from moeserve.workers.engine import Engine, EngineSettings, LocalModelRunner, RequestOutput, SamplingParams
from moeserve.workers.engine.core import EngineObserver
from moeserve.workers.engine.sampler import filtered_probs
from moeserve.workers.engine.speculative import SpeculativeStats, accept_greedy, accept_sampled
from moeserve.workers.model.loader import load_model
from moeserve.workers.model.mtp import MTPLayer, load_mtp
from moeserve.workers.model.random_checkpoint import PRESETS, write_random_checkpoint
from moeserve.workers.model.transformer import Transformer
from tests.builders import prefill_logits

pytestmark = pytest.mark.unit
ALPHA = 0.001  # significance level of the chi-square tests


def chi_square_p_value(
    observed: dict[tuple[int, ...], int], expected_probs: dict[tuple[int, ...], float]
) -> float:
    """Pearson's goodness-of-fit test; cells expected below 5 are pooled into one."""
    n = sum(observed.values())
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for cell, prob in expected_probs.items():
        e = n * prob
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + observed.get(cell, 0), pooled_exp + e
            continue
        stat += (observed.get(cell, 0) - e) ** 2 / e
        df += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    assert not set(observed) - set(expected_probs), "a sample outside the support"
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # noqa: ANN201
    """Tiny models: one thread is fastest, and far faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_mtp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Transformer, MTPLayer]:
    raw = {**PRESETS["tiny"], "num_nextn_predict_layers": 1}
    path = write_random_checkpoint(tmp_path_factory.mktemp("tiny-mtp"), raw, torch.float32, seed=3)
    model = load_model(path)
    return model, load_mtp(path, model)


@pytest.fixture(scope="module")
def small_vocab_mtp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Transformer, MTPLayer]:
    """Vocabulary 8 and wide weights, so the next-token distributions are far from uniform."""
    raw = {**PRESETS["tiny"], "vocab_size": 8, "hidden_size": 64, "num_nextn_predict_layers": 1}
    path = write_random_checkpoint(tmp_path_factory.mktemp("v8-mtp"), raw, torch.float32, seed=5, std=0.12)
    model = load_model(path)
    return model, load_mtp(path, model)


class PreemptionCount(EngineObserver):
    def __init__(self) -> None:
        self.preempted = 0

    def on_step(self, engine: Engine, num_tokens: int, num_preempted: int) -> None:
        self.preempted += num_preempted


def run_engine(
    model: Transformer,
    mtp: MTPLayer | None,
    prompts: list[list[int]],
    sampling: list[SamplingParams],
    **settings: object,
) -> tuple[list[list[int]], Engine]:
    s = EngineSettings(**{"kv_cache_tokens": 4096, **settings})  # type: ignore[arg-type]
    runner = LocalModelRunner(model, s.num_blocks, s.block_size, mtp=mtp)
    engine = Engine(runner, s, observer=PreemptionCount())
    outputs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    finished: list[RequestOutput] = []

    def sink_for(i: int):  # noqa: ANN202
        def sink(out: RequestOutput) -> None:
            outputs[i].extend(out.token_ids)
            if out.finished:
                finished.append(out)

        return sink

    for i, (prompt, params) in enumerate(zip(prompts, sampling, strict=True)):
        engine.add(engine.make_request(prompt, params, sink_for(i)))
    while engine.has_work:
        engine.step()
    assert all(f.finish_reason in ("stop", "length") for f in finished), finished
    return [outputs[i] for i in range(len(prompts))], engine


def test_accept_greedy() -> None:
    assert accept_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all accepted + bonus
    assert accept_greedy([5, 6, 7, 8], [5, 9, 7]) == [5, 6]  # second draft wrong: corrected
    assert accept_greedy([4, 6], [5]) == [4]
    assert accept_greedy([4], []) == [4]


def test_stats_per_position() -> None:
    stats = SpeculativeStats()
    stats.record(3, 1)
    stats.record(2, 2)
    assert stats.proposed[:3] == [2, 2, 1] and stats.accepted[:3] == [2, 1, 0]
    assert stats.acceptance_rate() == 3 / 5 and stats.acceptance_rate(1) == 0.5


def test_rejection_sampling_keeps_the_target_distribution() -> None:
    """One verification: the first emitted token follows p whatever q drafted it, and after an
    accepted draft the second follows the last row."""
    gen = torch.Generator().manual_seed(0)
    target = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.3, 2.0, 0.1, -2.0]])
    params = SamplingParams(temperature=1.0, top_k=4)
    q = torch.tensor([0.05, 0.05, 0.1, 0.6, 0.2])  # far from p; token 3 is outside p's top-4
    first: dict[tuple[int, ...], int] = {}
    pairs: dict[tuple[int, ...], int] = {}
    n = 8000
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=gen))
        out = accept_sampled(target, [draft], [q], params, gen)
        first[(out[0],)] = first.get((out[0],), 0) + 1
        if len(out) == 2:
            pairs[(out[1],)] = pairs.get((out[1],), 0) + 1
    p = filtered_probs(target[0], params)
    assert chi_square_p_value(first, {(t,): float(p[t]) for t in range(5) if p[t] > 0}) > ALPHA
    p2 = filtered_probs(target[1], params)
    assert chi_square_p_value(pairs, {(t,): float(p2[t]) for t in range(5) if p2[t] > 0}) > ALPHA
    assert chi_square_p_value(first, {(t,): float(q[t]) for t in range(5)}) < ALPHA  # the control


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_output_is_identical(tiny_mtp, k: int) -> None:
    """Chunked prefill (a 16-token budget), preemption (a small cache), prefix caching (shared
    prefixes) and continuous batching, with and without speculation."""
    model, mtp = tiny_mtp
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(2, 512, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(2, 512, (n,), generator=gen).tolist() for n in (3, 9, 20, 1)]
    prompts += [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (5, 30)]
    sampling = [
        SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (24, 7, 30, 12, 40, 18)
    ]
    limits = dict(max_num_batched_tokens=16, kv_cache_tokens=160, block_size=8)
    plain, plain_engine = run_engine(model, None, prompts, sampling, **limits)
    spec, engine = run_engine(
        model, mtp, prompts, sampling, speculative="mtp", num_speculative_tokens=k, **limits
    )
    assert spec == plain
    assert engine.scheduler.prefix.hit_tokens > 0 and plain_engine.scheduler.prefix.hit_tokens > 0
    assert cast(PreemptionCount, engine.observer).preempted > 0
    stats = engine.speculator.stats  # type: ignore[union-attr]
    assert stats.proposed[k - 1] > 0 and (k == 3 or stats.proposed[k] == 0)
    assert engine.runner.allocator.num_used == 0  # type: ignore[attr-defined]


def exact_distribution(
    model: Transformer, prompt: list[int], steps: int, params: SamplingParams
) -> dict[tuple[int, ...], float]:
    """P(t_1..t_steps | prompt) of the engine's sampling (filtered per token), by enumeration."""
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(steps):
        nxt: dict[tuple[int, ...], float] = {}
        for seq, pr in probs.items():
            p = filtered_probs(prefill_logits(model, prompt + list(seq))[-1], params)
            for t in range(p.numel()):
                if p[t] > 0:
                    nxt[seq + (t,)] = pr * float(p[t])
        probs = nxt
    return probs


@pytest.mark.slow
def test_sampled_output_follows_the_model_distribution(small_vocab_mtp) -> None:
    """4 tokens per request, vocabulary 8 (top-k 6), K = 2, 2000 seeded requests: the first
    verification decides tokens 2 and 3 (both draft positions: accepted, corrected or bonus), so
    the joint distribution of tokens 1-3 and the distribution of token 4 are tested against the exact
    ones (two tests at ALPHA each)."""
    model, mtp = small_vocab_mtp
    prompt = [3, 5, 2, 6]
    params = SamplingParams(max_tokens=4, temperature=0.9, top_k=6, ignore_eos=True)
    exact = exact_distribution(model, prompt, 4, params)
    n = 2000
    sampling = [SamplingParams(**{**params.__dict__, "seed": i}) for i in range(n)]
    spec, engine = run_engine(
        model, mtp, [prompt] * n, sampling, speculative="mtp", num_speculative_tokens=2, max_num_seqs=200
    )
    stats = engine.speculator.stats  # type: ignore[union-attr]
    assert 0 < stats.accepted[0] < stats.proposed[0] and 0 < stats.accepted[1] < stats.proposed[1]

    def marginal(probs: dict[tuple[int, ...], float], keep: slice) -> dict[tuple[int, ...], float]:
        out: dict[tuple[int, ...], float] = {}
        for cell, pr in probs.items():
            out[cell[keep]] = out.get(cell[keep], 0.0) + pr
        return out

    for keep in (slice(0, 3), slice(3, 4)):
        counts: dict[tuple[int, ...], int] = {}
        for out in spec:
            counts[tuple(out[keep])] = counts.get(tuple(out[keep]), 0) + 1
        assert chi_square_p_value(counts, marginal(exact, keep)) > ALPHA, keep
    hotter = exact_distribution(model, prompt, 3, SamplingParams(temperature=1.3, top_k=6))
    first3 = {}
    for out in spec:
        first3[tuple(out[:3])] = first3.get(tuple(out[:3]), 0) + 1
    assert chi_square_p_value(first3, hotter) < ALPHA  # the control: a wrong distribution is caught


def test_speculation_needs_an_mtp_layer(tiny_mtp) -> None:
    model, _ = tiny_mtp
    runner = LocalModelRunner(model, 8, 16)
    with pytest.raises(ValueError, match="speculative: .mtp. needs a model with an MTP layer"):
        Engine(runner, EngineSettings(speculative="mtp"))
    with pytest.raises(ValueError, match="num_speculative_tokens: must be in"):
        EngineSettings(speculative="mtp", num_speculative_tokens=4)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])  # bf16: widened, as on AVX2
def test_embedded_model_drafts_are_accepted_and_greedy_is_identical(weights: torch.dtype) -> None:
    """The embedded default model's trained MTP layer: drafts at both positions are often kept
    (the accepted path and the roll-back of a partly rejected chain), and greedy stays identical.
    With bf16 weights under fp32 the MTP layer shares the main model's widened head."""
    from moeserve.workers.model.loader import EMBEDDED_MODEL_PATH
    from moeserve.workers.model.tokenizer import Tokenizer

    model = load_model(EMBEDDED_MODEL_PATH, matmul_weights=weights)
    mtp = load_mtp(EMBEDDED_MODEL_PATH, model)
    tok = Tokenizer.from_model_dir(EMBEDDED_MODEL_PATH)
    assert tok is not None
    texts = ["import os\nimport sys\n\n\ndef main():\n    ", "class Parser:\n    def __init__(self, text):\n"]
    prompts = [tok.encode(t) for t in texts]
    sampling = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True) for _ in prompts]
    plain, _ = run_engine(model, None, prompts, sampling)
    spec, engine = run_engine(model, mtp, prompts, sampling, speculative="mtp", num_speculative_tokens=2)
    assert spec == plain
    stats = engine.speculator.stats  # type: ignore[union-attr]
    assert stats.acceptance_rate(0) > 0.4 and 0 < stats.accepted[1] < stats.proposed[1]
