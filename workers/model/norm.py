"""RMSNorm: normalise in fp32, scale, round once to the input dtype.

This is DeepSeek's reference inference (`F.rms_norm`, one fused kernel). transformers rounds the
normalised x to the input dtype before scaling: identical in fp32, at most one ulp apart in bf16
(`rms_norm_reference` is that formula; the tests hold the two together).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            return rms_norm_reference(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' DeepseekV2RMSNorm, op for op."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
