"""The DeepSeek-V2/V3 transformer: embedding, MLA + (dense MLP | MoE) blocks, final norm, head.

One `forward` serves prefill, chunked prefill and decode alike: it takes a `ForwardBatch` of
flattened tokens and the paged latent cache, and returns logits. Routed experts are reached through
a `RoutedExecutor`, so the same module runs single-process (local experts) or as an attention rank
(all-to-all to expert ranks). `forward_decode` is the decode step alone with static shapes and no
host sync (local experts only), what CUDA graphs capture. The model never samples, schedules or
tokenizes.
Legend: T tokens, S sequences, D hidden, V vocab.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from moeserve.workers.model.batch import DecodeInputs, ForwardBatch
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.kv_cache import PagedLatentCache
from moeserve.workers.model.mla import MLA, AttnImpl
from moeserve.workers.model.moe import (
    MLP,
    LocalRoutedExecutor,
    MoE,
    PendingMoE,
    RoutedExecutor,
    RoutedExperts,
)
from moeserve.workers.model.norm import RMSNorm
from moeserve.workers.model.rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, with_routed_experts: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MLA(config, layer)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn: MLP | MoE = (
            MoE(config, layer, with_routed_experts)
            if config.is_moe_layer(layer)
            else MLP(config.hidden_size, config.intermediate_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cache: PagedLatentCache,
        rope: RotaryEmbedding,
        routed: RoutedExecutor,
        attn_impl: AttnImpl,
    ) -> torch.Tensor:
        x = self.attention(x, batch, cache, rope, attn_impl)
        return x + self.ffn_out(self.start_ffn(x, routed))

    def attention(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cache: PagedLatentCache,
        rope: RotaryEmbedding,
        attn_impl: AttnImpl,
    ) -> torch.Tensor:
        """x [T, D] -> x + MLA(norm(x)), the residual stream after this block's attention."""
        return x + self.attn(self.attn_norm(x), batch, cache, rope, attn_impl)

    def start_ffn(self, x: torch.Tensor, routed: RoutedExecutor) -> PendingMoE | torch.Tensor:
        """Start the feed-forward part on x [T, D]: an MoE layer's routed tokens go out (and come
        back with `ffn_out`); a dense MLP is computed at once. The split lets micro-batches
        interleave while tokens are with the expert ranks (`parallel.micro_batch`)."""
        h = self.ffn_norm(x)
        return self.ffn.start(h, routed) if isinstance(self.ffn, MoE) else self.ffn(h)

    @staticmethod
    def ffn_out(started: PendingMoE | torch.Tensor) -> torch.Tensor:
        return started.wait() if isinstance(started, PendingMoE) else started


class Transformer(nn.Module):
    """Weights of the attention side, plus (unless `with_routed_experts=False`) every routed expert."""

    def __init__(
        self, config: ModelConfig, with_routed_experts: bool = True, max_positions: int | None = None
    ):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [Block(config, i, with_routed_experts) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config, max_positions)
        self.attn_impl: AttnImpl = "auto"

    @property
    def blocks(self) -> list[Block]:
        return cast("list[Block]", list(self.layers))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def local_experts(self) -> dict[int, RoutedExperts]:
        return {
            i: block.ffn.experts
            for i, block in enumerate(self.layers)
            if isinstance(block.ffn, MoE) and block.ffn.experts is not None
        }

    def local_executor(self) -> LocalRoutedExecutor:
        return LocalRoutedExecutor(self.local_experts())

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        cache: PagedLatentCache,
        routed: RoutedExecutor | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Logits [S, V] at each sequence's last new token, or [T, V] with `all_logits` (fp32)."""
        routed = routed or self.local_executor()
        x = self.embed(batch.input_ids)  # [T, D]
        for block in self.layers:
            x = block(x, batch, cache, self.rope, routed, self.attn_impl)
        return self.logits(x, batch, all_logits)

    @torch.inference_mode()
    def hidden_states(
        self, batch: ForwardBatch, cache: PagedLatentCache, routed: RoutedExecutor | None = None
    ) -> torch.Tensor:
        """Hidden states [T, D] of every new token after the final norm: what the head reads, and
        what an MTP layer drafts from (`mtp.py`). `head_logits` turns rows of it into logits."""
        routed = routed or self.local_executor()
        x = self.embed(batch.input_ids)  # [T, D]
        for block in self.layers:
            x = block(x, batch, cache, self.rope, routed, self.attn_impl)
        return self.norm(x)

    @torch.inference_mode()
    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rows [R, D] of `hidden_states` -> logits [R, V] fp32."""
        return self.head(hidden).float()

    def logits(self, x: torch.Tensor, batch: ForwardBatch, all_logits: bool = False) -> torch.Tensor:
        """Residual stream x [T, D] after the last block -> logits [S, V] at each sequence's last new
        token, or [T, V] with `all_logits` (fp32)."""
        if not all_logits:
            x = x[batch.last_token_rows]  # [S, D]
        return self.head(self.norm(x)).float()

    def forward_decode(self, inputs: DecodeInputs, cache: PagedLatentCache, splits: int = 1) -> torch.Tensor:
        """A decode step with static shapes and no host sync, local routed experts only: logits
        [B, V] fp32, one row per input row. What CUDA graphs capture (`cuda_graphs.py`); on the CPU
        it compiles with `torch.compile(fullgraph=True)`. `splits`: the paged attention's split of
        each context (a static launch size). Callers run it under `torch.inference_mode()` or
        `torch.no_grad()` (the compiler does not trace inference mode)."""
        x = self.embed(inputs.input_ids)  # [B, D]
        tables = self.rope.tables(inputs.positions)  # [B, 1, R/2], once for every layer
        for block in self.blocks:
            x = x + block.attn.forward_decode(block.attn_norm(x), inputs, tables, cache, self.rope, splits)
            h = block.ffn_norm(x)
            x = x + (block.ffn.forward_local(h) if isinstance(block.ffn, MoE) else block.ffn(h))
        return self.head(self.norm(x)).float()

    def prepare_decode(self) -> None:
        """Build what decode derives from the weights once (absorbed W_UK / W_UV), outside any
        graph capture or compilation."""
        for block in self.blocks:
            block.attn._absorbed_weights()
