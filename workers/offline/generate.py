"""Offline batched generation: prefill every prompt, then decode them together over the paged cache.

This is the single-process path behind `moeserve generate --model`; it has no queue, no admission
control and no streaming (the serving engine has those). Token ids in, token ids out: text is the
CLI's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.workers.model.batch import ForwardBatch, SequenceStep
from moeserve.workers.model.kv_cache import PagedLatentCache
from moeserve.workers.model.moe import RoutedExecutor
from moeserve.workers.model.transformer import Transformer


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    seed: int | None = None
    stop_at_eos: bool = True


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits [S, V] fp32 -> token ids [S]. Greedy at temperature 0."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_cache(model: Transformer, seq_lengths: list[int], block_size: int = 16) -> PagedLatentCache:
    """A cache with room for sequences of these lengths (plus the reserved padding block)."""
    cfg = model.config
    blocks = sum(-(-n // block_size) for n in seq_lengths) + 1
    return PagedLatentCache(
        cfg.num_hidden_layers, blocks, block_size, cfg.latent_dim, model.dtype, model.device
    )


def generate(
    model: Transformer,
    prompts: list[list[int]],
    settings: GenerationSettings,
    routed: RoutedExecutor | None = None,
    block_size: int = 16,
) -> list[list[int]]:
    """Generated ids (prompt excluded) for each prompt, decoded as one batch."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cache = make_cache(model, [len(p) + settings.max_tokens for p in prompts], block_size)
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(settings.seed)
    eos = set(model.config.eos_token_ids) if settings.stop_at_eos else set()
    seqs = [cache.new_sequence() for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    pending = [list(p) for p in prompts]  # tokens to feed next step
    while active:
        steps = []
        for i in active:
            seqs[i].reserve(cache.allocator, len(pending[i]))
            steps.append(SequenceStep(pending[i], seqs[i].num_tokens, seqs[i].blocks))
        logits = model(ForwardBatch.build(steps, block_size, model.device), cache, routed)
        next_ids = sample(logits, settings.temperature, generator).tolist()
        still = []
        for i, token in zip(active, next_ids, strict=True):
            seqs[i].num_tokens += len(pending[i])
            outputs[i].append(token)
            pending[i] = [token]
            if len(outputs[i]) < settings.max_tokens and token not in eos:
                still.append(i)
        active = still
    for seq in seqs:
        seq.release(cache.allocator)
    return outputs
