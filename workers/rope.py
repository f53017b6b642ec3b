"""Rotary position embedding for the `qk_rope_head_dim` slice of MLA, with YaRN scaling.

DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ...; a V3 config may instead ask for the
half-split layout (x_i, x_{i+d/2}) with `rope_interleave: false`. Both the query and the shared key
go through the same function, so attention scores never depend on the output layout.
This module is pure math: no cache, no weights.
"""

from __future__ import annotations

import math

import torch

from moeserve.workers.config import ModelConfig, RopeConfig, yarn_mscale


def inverse_frequencies(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [dim/2] (fp32) and the factor applied to cos/sin."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    base = 1.0 / (rope.theta**exponents)
    if rope.type == "default":
        return base, 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1 keeps the original frequency (high-frequency pairs)
    inv_freq = (base / rope.factor) * (1 - extrapolate) + base * extrapolate
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(
            rope.factor, rope.mscale_all_dim
        )
    else:
        attention_factor = yarn_mscale(rope.factor)
    return inv_freq, attention_factor


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables [max_positions, dim/2]; `forward` rotates [..., T, heads, dim]."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        dim = config.qk_rope_head_dim
        self.interleave = config.rope_interleave
        inv_freq, attention_factor = inverse_frequencies(config.rope, dim)
        n = max_positions or config.max_position_embeddings
        angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [P, dim/2]
        self.register_buffer("cos", torch.cos(angles) * attention_factor, persistent=False)
        self.register_buffer("sin", torch.sin(angles) * attention_factor, persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, d/2] at these positions (gather once per step, use in every layer)."""
        return self.cos[positions][:, None, :], self.sin[positions][:, None, :]

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: [T, H, d] (H may be 1 for the shared key); positions: [T]. Computes in fp32."""
        cos, sin = tables if tables is not None else self.tables(positions)
        xf = x.float()
        if self.interleave:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            # interleaved output, the layout of DeepSeek's complex multiplication
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            half = xf.shape[-1] // 2
            x1, x2 = xf[..., :half], xf[..., half:]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)
