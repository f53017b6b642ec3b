"""How one expert-parallel model instance runs (`EPSettings`): every rank and launcher gets the same copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.serve_config import Fp8Weights
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.parallel.placement import ExpertPlacement, PlacementError
from moeserve.workers.parallel.rebalance import BalanceSettings
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
    fp8_weights: Fp8Weights = "dequantize"
    """An FP8 checkpoint's weights on every rank: dequantized at load, or kept fp8 (`model/fp8.py`)."""
    placement: tuple[tuple[int, ...], ...] | None = None
    """Explicit expert map (global expert ids per expert rank); None: `ExpertPlacement.for_model`."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    redundant_experts: int = 0
    """R: expert slots beyond one per routed expert, spread over the expert ranks (0 = no replicas)."""
    rebalance_interval: int = 0
    """Steps between load-balancing checks (EPLB over the tokens counted since the last one); 0 = never."""
    rebalance_min_gain: float = 0.05
    """A new map replaces a layer's map only if it lowers that layer's predicted max/mean rank load
    by at least this fraction (0 = any gain)."""
    expert_nodes: int = 1
    """Nodes the expert ranks span (consecutive ranks per node); > 1 keeps expert groups within nodes."""

    @property
    def layout(self) -> WorldLayout:
        return WorldLayout(self.attention_ranks, self.expert_ranks)

    def expert_placement(self, config: ModelConfig) -> ExpertPlacement:
        """The starting map; raises `PlacementError` (before any process starts) for bad settings."""
        if self.rebalance_interval < 0:
            raise PlacementError(f"rebalance interval must be >= 0 steps, got {self.rebalance_interval}")
        if not 0 <= self.rebalance_min_gain < 1:
            raise PlacementError(f"rebalance min gain must be in [0, 1), got {self.rebalance_min_gain}")
        if self.expert_nodes < 1 or self.expert_ranks % self.expert_nodes:
            raise PlacementError(
                f"{self.expert_ranks} expert ranks do not split evenly over {self.expert_nodes} node(s)"
            )
        return ExpertPlacement.for_model(config, self.expert_ranks, self.placement, self.redundant_experts)

    def balance_settings(self, config: ModelConfig, with_mtp: bool = False) -> BalanceSettings:
        """`with_mtp`: the MTP draft layer's MoE is served too (`--speculative mtp`), and balanced."""
        groups = config.n_group if config.topk_method != "greedy" else 1
        layers = served_moe_layers(config, with_mtp)
        interval, gain = self.rebalance_interval, self.rebalance_min_gain
        return BalanceSettings(interval, gain, groups, self.expert_nodes, layers)


def served_moe_layers(config: ModelConfig, with_mtp: bool) -> list[int]:
    """The MoE layers whose routed experts the expert ranks serve: the model's, then the MTP layer's
    (index num_hidden_layers) when it drafts and is a MoE layer."""
    mtp = config.num_hidden_layers
    extra = [mtp] if with_mtp and config.num_nextn_predict_layers > 0 and config.is_moe_layer(mtp) else []
    return list(config.moe_layers) + extra
