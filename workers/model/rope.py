"""Rotary position embedding for the `qk_rope_head_dim` slice of MLA, with YaRN scaling.

DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ...; a V3 config may instead ask for the
half-split layout (x_i, x_{i+d/2}) with `rope_interleave: false`. Both the query and the shared key
go through the same function, so attention scores never depend on the output layout.
This module is pure math: no cache, no weights.
"""

from __future__ import annotations

import math

import torch

from moeserve.workers.model.config import ModelConfig, RopeConfig, yarn_mscale


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
    """Precomputed rotations cos + i·sin [max_positions, dim/2] (complex64, YaRN's attention factor
    included); `forward` rotates [..., T, heads, dim]."""

    cis: torch.Tensor

    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        dim = config.qk_rope_head_dim
        self.interleave = config.rope_interleave
        inv_freq, attention_factor = inverse_frequencies(config.rope, dim)
        n = max_positions or config.max_position_embeddings
        angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [P, dim/2]
        cis = torch.complex(torch.cos(angles) * attention_factor, torch.sin(angles) * attention_factor)
        self.register_buffer("cis", cis, persistent=False)

    def tables(self, positions: torch.Tensor) -> torch.Tensor:
        """cos + i·sin [T, 1, d/2] at these positions (gather once per step, use in every layer)."""
        return self.cis[positions][:, None, :]

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [T, H, d] (H may be 1 for the shared key); positions: [T]. Computes in fp32."""
        cis = tables if tables is not None else self.tables(positions)
        xf = x.float().contiguous()
        if self.interleave:
            # pair (x0, x1) is the complex number x0 + i·x1, rotated by one complex multiplication:
            # DeepSeek's own formulation, and a third of the kernels of the real-valued one (decode
            # at batch 1 is bound by per-kernel overhead)
            out = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * cis).flatten(-2)
        else:
            out = rotate_reference(xf, cis.real, cis.imag, interleave=False)
        return out.to(x.dtype)


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """The rotation written out over real numbers: x [..., d] fp32, cos/sin broadcastable to [..., d/2]."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        # interleaved output, the layout of DeepSeek's complex multiplication
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
