"""Micro-batch ping-pong: one step's sequences split in two, interleaved layer by layer.

Each micro-batch runs the same block parts as `Transformer.forward` (`Block.attention`,
`start_ffn`, `ffn_out`), as a generator that pauses after starting an MoE layer's dispatch.
Driving the generators round-robin gives, per MoE layer: attention(mb0) -> dispatch(mb0) ->
attention(mb1) -> dispatch(mb1) -> combine(mb0) -> attention of mb0's next layer -> ..., so expert
ranks compute one micro-batch while this rank computes the other (attention-FFN disaggregation as
in MegaScale-Infer / Step-3). Every attention rank issues the collectives in that same order, and
expert ranks serve them in that order. Sequences are independent, so the split changes nothing but
the matmul shapes. With a local executor the pause is a no-op. This module does not decide when to
split; the step loop does.
Legend: T tokens, S sequences, D hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from moeserve.workers.model.batch import ForwardBatch, SequenceStep
from moeserve.workers.model.kv_cache import PagedLatentCache
from moeserve.workers.model.moe import MoE, RoutedExecutor
from moeserve.workers.model.transformer import Transformer


def split_steps(steps: list[SequenceStep], parts: int) -> list[list[SequenceStep]]:
    """Contiguous, near-equal runs of sequences (earlier parts one longer); parts may be empty."""
    bounds = [-(-len(steps) * i // parts) for i in range(parts + 1)]
    return [steps[bounds[i] : bounds[i + 1]] for i in range(parts)]


@torch.inference_mode()
def forward_micro_batches(
    model: Transformer, batches: list[ForwardBatch], cache: PagedLatentCache, routed: RoutedExecutor
) -> list[torch.Tensor]:
    """Logits [S_i, V] (fp32, last new token of each sequence) for each micro-batch."""
    runs = [_forward(model, batch, cache, routed) for batch in batches]
    results: list[torch.Tensor | None] = [None] * len(runs)
    pending = list(range(len(runs)))
    while pending:
        for i in list(pending):
            try:
                next(runs[i])
            except StopIteration as done:
                results[i] = done.value
                pending.remove(i)
    return [r for r in results if r is not None]


def _forward(
    model: Transformer, batch: ForwardBatch, cache: PagedLatentCache, routed: RoutedExecutor
) -> Generator[None, None, torch.Tensor]:
    """`Transformer.forward` from the blocks' own parts, pausing while each MoE layer's tokens are
    with the expert ranks."""
    x = model.embed(batch.input_ids)  # [T, D]
    for block in model.layers:
        x = block.attention(x, batch, cache, model.rope, model.attn_impl)
        started = block.start_ffn(x, routed)
        if isinstance(block.ffn, MoE):
            yield  # the other micro-batch's attention runs while our tokens are away
        x = x + block.ffn_out(started)
    return model.logits(x, batch)
