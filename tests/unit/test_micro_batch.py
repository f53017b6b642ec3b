"""Micro-batch ping-pong in one process: same results as no split, interleaved order, empty batches."""

from __future__ import annotations

import pytest
import torch

from moeserve.workers.model.batch import ForwardBatch, SequenceStep
from moeserve.workers.model.loader import load_model
from moeserve.workers.model.moe import LocalRoutedExecutor, SplitPhaseRoutedExecutor
from moeserve.workers.offline.generate import GenerationSettings, generate, generate_lockstep, make_cache
from moeserve.workers.parallel.micro_batch import forward_micro_batches, split_steps

pytestmark = pytest.mark.unit
PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 37)), [3], list(range(40, 73))]


def test_split_steps_keeps_order_and_allows_empty_parts() -> None:
    a, b, c = (SequenceStep([i], 0, [1]) for i in range(3))
    assert split_steps([a, b, c], 2) == [[a, b], [c]]
    assert split_steps([a], 2) == [[a], []]
    assert split_steps([], 2) == [[], []]


@pytest.mark.parametrize("name", ["v2", "v3"])
def test_empty_batch_forward(name: str, reference_checkpoints) -> None:
    model = load_model(reference_checkpoints[name])
    logits = model(ForwardBatch.build([], 16), make_cache(model, [16]))
    assert logits.shape == (0, model.config.vocab_size)


@pytest.mark.parametrize("name", ["v2_lite", "v2"])
def test_ping_pong_equals_no_split(name: str, reference_checkpoints) -> None:
    model = load_model(reference_checkpoints[name])
    settings = GenerationSettings(max_tokens=6)
    plain = generate_lockstep(model, PROMPTS, settings, model.local_executor(), record_logits=True)
    split = generate_lockstep(
        model, PROMPTS, settings, model.local_executor(), ping_pong=True, record_logits=True
    )
    assert plain.token_ids == generate(model, PROMPTS, settings)
    assert split.token_ids == plain.token_ids
    for a, b in zip(split.logits, plain.logits, strict=True):
        assert a.shape == (6, model.config.vocab_size)
        assert (a - b).abs().max() <= 1e-5


class Logged:
    def __init__(self, y: torch.Tensor, log: list[str], label: str):
        self.y, self.log, self.label = y, log, label

    def wait(self) -> torch.Tensor:
        self.log.append(f"wait {self.label}")
        return self.y


class RecordingExecutor:
    """Split-phase in name only: records the order in which layers start and finish."""

    def __init__(self, local: LocalRoutedExecutor, log: list[str]):
        self.local = local
        self.log = log

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a split-phase executor is always started")

    def start(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> Logged:
        label = f"{layer} T={x.shape[0]}"
        self.log.append(f"start {label}")
        return Logged(self.local(layer, x, ids, w), self.log, label)


def test_micro_batches_interleave_layer_by_layer(reference_checkpoints) -> None:
    model = load_model(reference_checkpoints["v2_lite"])  # MoE layers 1 and 2
    log: list[str] = []
    executor = RecordingExecutor(model.local_executor(), log)
    assert isinstance(executor, SplitPhaseRoutedExecutor)
    cache = make_cache(model, [16, 16, 16])
    steps = []
    for prompt in [[1, 2], [3, 4, 5], [6]]:
        seq = cache.new_sequence()
        seq.reserve(cache.allocator, len(prompt))
        steps.append(SequenceStep(prompt, 0, seq.blocks))
    parts = [ForwardBatch.build(p, 16) for p in split_steps(steps, 2)]  # 5 tokens, then 1
    out = forward_micro_batches(model, parts, cache, executor)
    whole = model(ForwardBatch.build(steps, 16), cache, model.local_executor())
    assert (torch.cat(out) - whole).abs().max() <= 1e-5
    assert log == [
        "start 1 T=5",
        "start 1 T=1",
        "wait 1 T=5",
        "start 2 T=5",
        "wait 1 T=1",
        "start 2 T=1",
        "wait 2 T=5",
        "wait 2 T=1",
    ]
