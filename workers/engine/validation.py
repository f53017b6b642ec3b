"""A weight-less twin of the ranks' engine, for front ends that check requests before sending them on.

The expert-parallel front ends (local ranks and Ray Serve) hold no model; they validate each request
against an `Engine` with the ranks' limits, vocabulary and tokenizer whose runner only describes the
model (`ShapeRunner`) and never steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moeserve.engine_settings import EngineSettings
from moeserve.workers.engine.core import Engine
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.kv_cache import BlockAllocator
from moeserve.workers.model.tokenizer import Tokenizer


class ShapeRunner:
    """A `ModelRunner` that only describes the model, so the front end can validate requests."""

    def __init__(self, config: ModelConfig, settings: EngineSettings):
        self.block_size = settings.block_size
        self.allocator = BlockAllocator(settings.num_blocks)
        self.vocab_size = config.vocab_size
        self.max_positions = config.max_position_embeddings
        # the ranks draft with the checkpoint's MTP layer (`--speculative mtp`): the twin's limits
        # then leave the same room for draft slots as theirs
        self.has_mtp = config.num_nextn_predict_layers > 0

    def step(self, steps: list[Any]) -> torch.Tensor:
        raise RuntimeError("the front end's engine twin never steps")


def validation_engine(model_path: Path, settings: EngineSettings, tokenizer: Tokenizer | None) -> Engine:
    """An engine with the ranks' limits and vocabulary that is only used to check requests."""
    config = ModelConfig.from_file(model_path)
    return Engine(ShapeRunner(config, settings), settings, config.eos_token_ids, tokenizer)
