"""The engine's view of a model: `ModelRunner` runs one step of many sequences over its KV cache.

`LocalModelRunner` is the single-process runner: the whole model and its paged latent cache in this
process. An attention rank of an expert-parallel instance implements the same protocol (its
`Transformer` with an all-to-all `RoutedExecutor`), so the engine drives either unchanged. Runners
do not schedule or sample.
Legend: S sequences in the step, V vocab, T tokens, K experts per token, E routed experts.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch

from moeserve.workers.model.batch import ForwardBatch, SequenceStep
from moeserve.workers.model.kv_cache import BlockAllocator, PagedLatentCache
from moeserve.workers.model.moe import LocalRoutedExecutor, RoutedExecutor
from moeserve.workers.model.mtp import MTPLayer
from moeserve.workers.model.transformer import Transformer


class ModelRunner(Protocol):
    """What the engine needs from a model."""

    @property
    def block_size(self) -> int: ...

    @property
    def allocator(self) -> BlockAllocator:
        """Allocator over this runner's KV-cache blocks; the engine reserves and releases through it."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_positions(self) -> int:
        """Longest sequence the model supports (max_position_embeddings)."""
        ...

    def step(self, steps: list[SequenceStep]) -> torch.Tensor:
        """Run one step; logits [S, V] fp32 at each sequence's last new token."""
        ...


class ExpertLoad:
    """Tokens routed to each expert of each MoE layer, accumulated across steps (thread-safe reads)."""

    def __init__(self, moe_layers: list[int], n_experts: int):
        self.moe_layers = list(moe_layers)
        self.n_experts = n_experts
        self._row = {layer: i for i, layer in enumerate(self.moe_layers)}
        self._counts = torch.zeros(len(self.moe_layers), n_experts, dtype=torch.long)  # [L_moe, E]
        self._lock = threading.Lock()

    def add(self, layer: int, ids: torch.Tensor) -> None:
        """ids [T, K] global expert ids chosen by the router of `layer`."""
        counts = torch.bincount(ids.flatten().cpu(), minlength=self.n_experts)  # [E]
        with self._lock:
            self._counts[self._row[layer]] += counts

    def snapshot(self) -> dict[int, list[int]]:
        """layer -> tokens routed to each expert so far."""
        with self._lock:
            rows = self._counts.tolist()
        return dict(zip(self.moe_layers, rows, strict=True))


class CountingExecutor:
    """A RoutedExecutor that records the router's choices, then delegates."""

    def __init__(self, inner: RoutedExecutor, load: ExpertLoad):
        self.inner = inner
        self.load = load

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.load.add(layer, ids)
        return self.inner(layer, x, ids, weights)


class LocalModelRunner:
    """The whole model in this process, with a paged latent cache of `num_blocks` blocks. With an
    `mtp` layer it is also a `SpeculativeRunner`: the cache gets one more layer (the MTP layer's,
    same block tables) and the MTP layer's MoE goes through the same routed executor."""

    def __init__(
        self,
        model: Transformer,
        num_blocks: int,
        block_size: int,
        routed: RoutedExecutor | None = None,
        device: torch.device | str = "cpu",
        mtp: MTPLayer | None = None,
    ):
        cfg = model.config
        self.model = model
        self.mtp = mtp
        self.device = torch.device(device)
        layers = cfg.num_hidden_layers + (1 if mtp is not None else 0)
        self.cache = PagedLatentCache(layers, num_blocks, block_size, cfg.latent_dim, model.dtype, device)
        moe_layers = cfg.moe_layers + ([mtp.layer] if mtp is not None and cfg.is_moe_layer(mtp.layer) else [])
        self.expert_load = ExpertLoad(moe_layers, cfg.n_routed_experts)
        if routed is None:
            local = model.local_experts() | (mtp.local_experts() if mtp is not None else {})
            routed = LocalRoutedExecutor(local)
        self.routed = CountingExecutor(routed, self.expert_load)

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    @property
    def allocator(self) -> BlockAllocator:
        return self.cache.allocator

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def max_positions(self) -> int:
        return self.model.config.max_position_embeddings

    def step(self, steps: list[SequenceStep]) -> torch.Tensor:
        batch = ForwardBatch.build(steps, self.block_size, self.device)
        return self.model(batch, self.cache, self.routed).cpu()  # [S, V] fp32

    # SpeculativeRunner
    @property
    def has_mtp(self) -> bool:
        return self.mtp is not None

    def step_hidden(self, steps: list[SequenceStep]) -> torch.Tensor:
        batch = ForwardBatch.build(steps, self.block_size, self.device)
        return self.model.hidden_states(batch, self.cache, self.routed)  # [T, D]

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head_logits(hidden).cpu()  # [R, V] fp32

    def mtp_step(self, steps: list[SequenceStep], previous_hidden: torch.Tensor) -> torch.Tensor:
        if self.mtp is None:
            raise RuntimeError("this runner has no MTP layer")
        batch = ForwardBatch.build(steps, self.block_size, self.device)
        return self.mtp(batch, previous_hidden, self.cache, self.model.rope, self.routed)  # [T, D]

    def mtp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mtp is None:
            raise RuntimeError("this runner has no MTP layer")
        return self.mtp.logits(hidden).cpu()  # [R, V] fp32
