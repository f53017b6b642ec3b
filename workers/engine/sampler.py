"""Per-request sampling from a step's logits: greedy, temperature, top-k, top-p, and logprobs.

Each sampled request draws from its own `torch.Generator`, one draw per token, so a seeded
request gives the same tokens whatever else shares its batch. Greedy rows are one batched argmax.
Numerically safe for every temperature the API accepts: logits are fp32 with their maximum
subtracted before scaling (the best token scales to exactly 0, so the softmax never sees inf - inf),
and temperatures below `MIN_TEMPERATURE` sample as at `MIN_TEMPERATURE` (in effect greedy; exact
ties stay random), above `MAX_TEMPERATURE` as at it; top-k ranks the raw logits, so it holds at
any temperature. The top token always survives top-k and top-p, so a row always has mass.
Legend: S sequences sampled this step, V vocab.
"""

from __future__ import annotations

import torch

from moeserve.workers.engine.request import SamplingParams, TokenLogprobs

MIN_TEMPERATURE = 1e-5  # smaller temperatures are clamped to it: fp32 division stays finite
MAX_TEMPERATURE = torch.finfo(torch.float32).max  # larger ones (doubles only) would divide by inf


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row [V] -> fp32 probabilities after temperature, top-k and top-p (renormalised)."""
    logits = logits.float()
    temperature = min(max(params.temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)
    scaled = (logits - logits.max()) / temperature  # [V], the best exactly 0
    if 0 < params.top_k < scaled.numel():  # ranked on the raw logits: a huge temperature ties none
        kth = logits.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(logits < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        drop = before >= params.top_p
        drop[0] = False  # the most likely token always stays (top_p may round to 0 in fp32)
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
            tokens[row] = sample_row(logits[row], p, g)
    return tokens


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one row [V] of logits (raises on a row without finite logits)."""
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(filtered_probs(logits, params), 1, generator=generator))


def logprobs_of(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """Log-probabilities of one row [V] of raw logits: the chosen token's and the `top` best."""
    logp = logits.log_softmax(dim=-1)
    best = logp.topk(top) if top > 0 else None
    alternatives = (
        tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
    )
    return TokenLogprobs(token_id=token, logprob=float(logp[token]), top=alternatives)
