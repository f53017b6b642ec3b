"""How one expert-parallel model instance runs (`EPSettings`): every rank and launcher gets the same copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.workers.model.config import ModelConfig
from moeserve.workers.parallel.placement import ExpertPlacement
from moeserve.workers.parallel.world import Backend, WorldLayout


@dataclass(frozen=True)
class EPSettings:
    """How one expert-parallel model instance runs; every rank gets the same copy."""

    attention_ranks: int = 1
    """A: data-parallel attention ranks, each with its own requests and latent KV cache (>= 1)."""
    expert_ranks: int = 1
    """E: ranks holding the routed experts (>= 1; 0 is the single-process path, not this one)."""
    collective_timeout_s: float = 60.0
    """Seconds any collective of a step may wait for its peers before the rank fails (gloo/NCCL)."""
    startup_timeout_s: float = 600.0
    """Seconds ranks wait for each other to start and load their weights."""
    backend: Backend = "gloo"
    """gloo (CPU tensors) or nccl (one GPU per rank)."""
    dtype: torch.dtype = torch.float32
    """Weights and activations; routing stays fp32."""
    placement: tuple[tuple[int, ...], ...] | None = None
    """Explicit expert map (global expert ids per expert rank); None: `ExpertPlacement.for_model`."""
    block_size: int = 16
    """Tokens per KV-cache block."""

    @property
    def layout(self) -> WorldLayout:
        return WorldLayout(self.attention_ranks, self.expert_ranks)

    def expert_placement(self, config: ModelConfig) -> ExpertPlacement:
        return ExpertPlacement.for_model(config, self.expert_ranks, self.placement)
