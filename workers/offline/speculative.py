"""Offline generation with MTP speculative decoding: `moeserve generate --speculative mtp`.

The offline loop in `generate.py` has no drafts; this runs the prompts through the serving engine
(`Engine` over a `LocalModelRunner` holding the MTP layer) in this process, with every request
admitted at once, and returns the generated ids per prompt. It knows nothing about tokenization.
"""

from __future__ import annotations

from moeserve.engine_settings import EngineSettings
from moeserve.workers.engine.core import Engine
from moeserve.workers.engine.request import RequestOutput, SamplingParams
from moeserve.workers.engine.runner import LocalModelRunner
from moeserve.workers.engine.speculative import SpeculativeStats
from moeserve.workers.model.mtp import MTPLayer
from moeserve.workers.model.transformer import Transformer
from moeserve.workers.offline.generate import GenerationSettings


def generate_speculative(
    model: Transformer,
    mtp: MTPLayer,
    prompts: list[list[int]],
    settings: GenerationSettings,
    num_speculative_tokens: int = 1,
    block_size: int = 16,
) -> tuple[list[list[int]], SpeculativeStats]:
    """Generated ids (prompt excluded) for each prompt, and the drafts' statistics. With a seed,
    prompt i samples with seed + i (its own generator, as the engine does per request)."""
    longest = max(len(p) for p in prompts) + settings.max_tokens
    engine_settings = EngineSettings(
        block_size=block_size,
        kv_cache_tokens=(longest + num_speculative_tokens) * len(prompts) + block_size * len(prompts),
        max_num_seqs=max(1, len(prompts)),
        max_num_batched_tokens=max(2048, longest),
        max_model_len=longest + 1,
        speculative="mtp",
        num_speculative_tokens=num_speculative_tokens,
        prefix_caching=False,
    )
    runner = LocalModelRunner(model, engine_settings.num_blocks, block_size, device=model.device, mtp=mtp)
    eos = model.config.eos_token_ids if settings.stop_at_eos else ()
    engine = Engine(runner, engine_settings, eos)
    outputs: list[list[int]] = [[] for _ in prompts]
    for i, prompt in enumerate(prompts):
        sampling = SamplingParams(
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            seed=None if settings.seed is None else settings.seed + i,
        )

        def sink(out: RequestOutput, i: int = i) -> None:
            outputs[i].extend(out.token_ids)

        engine.add(engine.make_request(prompt, sampling, sink))
    while engine.has_work:
        engine.step()
    assert engine.speculator is not None
    return outputs, engine.speculator.stats
