"""Per-request sampling: seeded draws independent of batch composition, filters, logprobs."""

from __future__ import annotations

import pytest
import torch

from moeserve.workers.engine.request import SamplingParams
from moeserve.workers.engine.sampler import filtered_probs, logprobs_of, sample

pytestmark = pytest.mark.unit


def draws(logits: torch.Tensor, params: SamplingParams, seed: int, n: int, others: int) -> list[int]:
    """n tokens for row 0 under `seed`, with `others` unrelated sampled rows in every batch."""
    mine = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(999)
    out = []
    for step in range(n):
        rows = [logits] + [torch.randn(logits.shape[0], generator=noise) for _ in range(others)]
        batch = torch.stack(rows)
        params_list = [params] + [SamplingParams(temperature=0.7 + 0.1 * i) for i in range(others)]
        gens = [mine] + [torch.Generator().manual_seed(step * 100 + i) for i in range(others)]
        out.append(sample(batch, params_list, gens)[0])
    return out


def test_seeded_draws_do_not_depend_on_the_rest_of_the_batch() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.3, top_k=20, top_p=0.9)
    alone = draws(logits, params, seed=7, n=30, others=0)
    assert draws(logits, params, seed=7, n=30, others=5) == alone
    assert draws(logits, params, seed=8, n=30, others=0) != alone


def test_greedy_top_k_1_and_tiny_top_p_all_pick_the_argmax() -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    best = logits.argmax(dim=-1).tolist()
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6)]
    for p in params:
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        assert sample(logits, [p] * 4, gens) == best


def test_top_k_and_top_p_keep_only_the_allowed_tokens() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    probs = filtered_probs(logits, SamplingParams(top_k=2))
    assert (probs[2:] == 0).all() and probs[:2].sum().item() == pytest.approx(1.0)
    full = logits.softmax(-1)
    # top_p=0.8: 0.64 + 0.24 reaches 0.8 after two tokens, so exactly two survive
    probs = filtered_probs(logits, SamplingParams(top_p=0.8))
    assert (probs[2:] == 0).all() and probs[0] / probs[1] == pytest.approx(full[0] / full[1])
    gen = torch.Generator().manual_seed(0)
    picked = {sample(logits[None], [SamplingParams(top_k=3)], [gen])[0] for _ in range(300)}
    assert picked == {0, 1, 2}


def test_temperature_sharpens_the_distribution() -> None:
    logits = torch.tensor([1.0, 0.0])
    cold = filtered_probs(logits, SamplingParams(temperature=0.25))
    hot = filtered_probs(logits, SamplingParams(temperature=4.0))
    assert cold[0] > logits.softmax(-1)[0] > hot[0] > 0.5


def test_logprobs_are_of_the_raw_distribution_best_first() -> None:
    logits = torch.tensor([0.0, 2.0, 1.0])
    lp = logprobs_of(logits, token=2, top=2)
    expected = logits.log_softmax(-1)
    assert lp.logprob == pytest.approx(expected[2].item())
    assert [t for t, _ in lp.top] == [1, 2] and lp.top[0][1] == pytest.approx(expected[1].item())
