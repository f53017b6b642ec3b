"""Offline batched generation: prefill every prompt, then decode them together over the paged cache.

One loop serves the single-process path behind `moeserve generate --model` (`generate`) and an
attention rank of an expert-parallel world (`generate_lockstep` with a `world`), where two rules keep
all-to-all from deadlocking:
- every step starts with `EPWorld.control`, which every rank joins; the world stops only when no
  attention rank has work left, and a rank whose own requests are done keeps stepping with an empty
  batch until then (expert ranks learn "continue" or "stop" from the same collective);
- the number of micro-batches is agreed in that collective too (the maximum asked for), so every
  rank issues the same collectives in the same order.
It has no queue, no admission control and no streaming (the serving engine has those), and knows
nothing about processes, placement or tokenization: token ids in, token ids out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moeserve.workers.engine.sampler import MAX_TEMPERATURE, MIN_TEMPERATURE
from moeserve.workers.model.batch import ForwardBatch, SequenceStep
from moeserve.workers.model.cuda_graphs import CudaGraphDecoder
from moeserve.workers.model.kv_cache import PagedLatentCache
from moeserve.workers.model.moe import RoutedExecutor
from moeserve.workers.model.transformer import Transformer
from moeserve.workers.parallel.micro_batch import forward_micro_batches, split_steps
from moeserve.workers.parallel.world import EPWorld, StepControl


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
    # as the engine's sampler: clamped so that the division stays finite, max subtracted first
    t = min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / t
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_cache(model: Transformer, seq_lengths: list[int], block_size: int = 16) -> PagedLatentCache:
    """A cache with room for sequences of these lengths (plus the reserved padding block)."""
    cfg = model.config
    blocks = sum(-(-n // block_size) for n in seq_lengths) + 1
    return PagedLatentCache(
        cfg.num_hidden_layers, blocks, block_size, cfg.latent_dim, model.dtype, model.device
    )


@dataclass
class LockstepResult:
    """Generated ids per prompt; with `record_logits`, logits [n_generated, V] fp32 per prompt."""

    token_ids: list[list[int]]
    logits: list[torch.Tensor] = field(default_factory=list)
    steps: int = 0  # steps this rank took part in, empty ones included
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step


def wanted_micro_batches(steps: list[SequenceStep], ping_pong: bool) -> int:
    """Two for a decode-only batch of two or more sequences when ping-pong is on, else one."""
    decode_only = bool(steps) and all(len(s.new_token_ids) == 1 for s in steps)
    return 2 if ping_pong and decode_only and len(steps) >= 2 else 1


def generate_lockstep(
    model: Transformer,
    prompts: list[list[int]],
    settings: GenerationSettings,
    routed: RoutedExecutor,
    world: EPWorld | None = None,
    ping_pong: bool = False,
    block_size: int = 16,
    record_logits: bool = False,
    on_step: Callable[[int], None] | None = None,
    cuda_graphs: bool = False,
) -> LockstepResult:
    """Generate for this rank's prompts (possibly none) while the world has work.

    `on_step(i)` runs as step i begins, after the step-control collective (step 0 is the prefill).
    `cuda_graphs` (single process, `routed` the model's own experts, a CUDA model): decode steps
    replay CUDA graphs of `Transformer.forward_decode`; prefill and mixed steps stay eager."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.device
    lengths = [len(p) + settings.max_tokens for p in prompts]
    cache = make_cache(model, lengths or [1], block_size)  # an idle rank still needs a (tiny) cache
    graphs = None
    if cuda_graphs and world is None and prompts:
        graphs = CudaGraphDecoder(model, cache, max_batch=len(prompts), max_context=max(lengths))
    generator = None
    if settings.seed is not None:  # one stream per attention rank
        generator = torch.Generator(device=device).manual_seed(settings.seed + (world.rank if world else 0))
    eos = set(model.config.eos_token_ids) if settings.stop_at_eos else set()
    seqs = [cache.new_sequence() for _ in prompts]
    result = LockstepResult([[] for _ in prompts])
    logits_of: list[list[torch.Tensor]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    pending = [list(p) for p in prompts]  # tokens to feed next step
    while True:
        t0 = time.perf_counter()  # a step's time includes its step-control collective
        steps = []
        for i in active:
            seqs[i].reserve(cache.allocator, len(pending[i]))
            steps.append(SequenceStep(pending[i], seqs[i].num_tokens, seqs[i].blocks))
        micro = wanted_micro_batches(steps, ping_pong)
        if world is not None:
            agreed = world.control(StepControl(bool(active), micro))
            go, micro = agreed.work, agreed.micro_batches
        else:
            go = bool(active)
        if not go:
            break
        if on_step is not None:
            on_step(result.steps)
        result.steps += 1
        if micro == 1:  # the no-split path: a decode step's graph, else the model's own forward
            batch = ForwardBatch.build(steps, block_size, device)
            graphed = graphs.decode(batch) if graphs is not None else None
            logits = graphed if graphed is not None else model(batch, cache, routed)
        else:
            parts = [ForwardBatch.build(p, block_size, device) for p in split_steps(steps, micro)]
            logits = torch.cat(forward_micro_batches(model, parts, cache, routed))  # [S, V]
        if not active:
            result.step_seconds.append(time.perf_counter() - t0)
            continue
        next_ids = sample(logits, settings.temperature, generator).tolist()
        still = []
        for row, (i, token) in enumerate(zip(active, next_ids, strict=True)):
            seqs[i].num_tokens += len(pending[i])
            result.token_ids[i].append(token)
            if record_logits:
                logits_of[i].append(logits[row].cpu())
            pending[i] = [token]
            if len(result.token_ids[i]) < settings.max_tokens and token not in eos:
                still.append(i)
        active = still
        result.step_seconds.append(time.perf_counter() - t0)
    for seq in seqs:
        seq.release(cache.allocator)
    if record_logits:
        result.logits = [torch.stack(rows) for rows in logits_of]
    return result


def generate(
    model: Transformer,
    prompts: list[list[int]],
    settings: GenerationSettings,
    routed: RoutedExecutor | None = None,
    block_size: int = 16,
    enforce_eager: bool = False,
) -> list[list[int]]:
    """Generated ids (prompt excluded) for each prompt, decoded as one batch in this process. On a
    CUDA device with its own experts, decode steps replay CUDA graphs unless `enforce_eager`."""
    graphs = routed is None and model.device.type == "cuda" and not enforce_eager
    routed = routed or model.local_executor()
    return generate_lockstep(
        model, prompts, settings, routed, block_size=block_size, cuda_graphs=graphs
    ).token_ids
