"""The fast forms of RMSNorm and RoPE agree with their written-out references."""

from __future__ import annotations

import pytest
import torch
from builders import tiny_config

from moeserve.workers.model.norm import RMSNorm, rms_norm_reference
from moeserve.workers.model.rope import RotaryEmbedding, rotate_reference

pytestmark = pytest.mark.unit


def test_rms_norm_is_exact_in_fp32_and_within_one_ulp_in_bf16() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 256, generator=gen) * 3
    norm = RMSNorm(256, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(256, generator=gen) + 0.5)
    assert torch.equal(norm(x), rms_norm_reference(x, norm.weight, 1e-6))
    norm16, x16 = norm.to(torch.bfloat16), x.to(torch.bfloat16)
    fused, ref = norm16(x16).float(), rms_norm_reference(x16, norm16.weight, 1e-6).float()
    ulp = 2.0 ** (torch.frexp(ref.abs()).exponent - 8).float()  # bf16 has 8 significant bits
    assert ((fused - ref).abs() <= ulp).all()
    assert (fused != ref).any()  # the two really are different roundings: this test compares them


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_matches_the_real_valued_rotation(interleave: bool) -> None:
    cfg = tiny_config(rope_interleave=interleave)
    rope = RotaryEmbedding(cfg, max_positions=64)
    positions = torch.tensor([0, 5, 17, 63])
    x = torch.randn(4, 3, cfg.qk_rope_head_dim, generator=torch.Generator().manual_seed(1))
    cis = rope.tables(positions)
    expected = rotate_reference(x, cis.real, cis.imag, interleave)
    assert torch.allclose(rope(x, positions), expected, atol=1e-6)
    assert torch.allclose(rope(x, positions, cis), expected, atol=1e-6)
    assert torch.equal(rope(x[:1], positions[:1]), x[:1])  # position 0 does not rotate
    # a non-contiguous input takes the same path
    wide = torch.cat([x, x], dim=-1)[..., : cfg.qk_rope_head_dim]
    assert torch.allclose(rope(wide, positions), expected, atol=1e-6)
