"""Per-request sampling from a step's logits: greedy, temperature, top-k, top-p, and logprobs.

Each sampled request draws from its own `torch.Generator`, one draw per token, so a seeded
request gives the same tokens whatever else shares its batch. Greedy rows are one batched argmax.
Legend: S sequences sampled this step, V vocab.
"""

from __future__ import annotations

import torch

from moeserve.workers.engine.request import SamplingParams, TokenLogprobs


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row [V] fp32 -> probabilities after temperature, top-k and top-p (renormalised)."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.numel():
        kth = scaled.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        drop = before >= params.top_p  # the first token is always kept
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """logits [S, V] fp32 -> one token id per row, each row by its own parameters and generator."""
    tokens = logits.argmax(dim=-1).tolist()  # [S]; greedy rows keep these
    for row, (p, g) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            tokens[row] = int(torch.multinomial(filtered_probs(logits[row], p), 1, generator=g))
    return tokens


def logprobs_of(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """Log-probabilities of one row [V] of raw logits: the chosen token's and the `top` best."""
    logp = logits.log_softmax(dim=-1)
    best = logp.topk(top) if top > 0 else None
    alternatives = (
        tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
    )
    return TokenLogprobs(token_id=token, logprob=float(logp[token]), top=alternatives)
