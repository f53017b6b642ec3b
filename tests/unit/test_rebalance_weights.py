"""The rebalance's weight transport: an expert's parameters as raw bytes and back, bit for bit.

Kept experts are copied, arrived ones rebuilt from the bytes another rank sent, for plain and for
fp8 block-scaled experts (their scales travel with them). The collective itself is tested over
real processes in `tests/integration/test_redundant_experts.py`.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.workers.model.moe import RoutedExperts
from moeserve.workers.parallel.rebalance import _expert_as_bytes, _expert_bytes, _rebuilt

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("fp8_block", [None, (128, 128)], ids=["bf16", "fp8"])
def test_experts_survive_the_byte_transport_bit_for_bit(fp8_block: tuple[int, int] | None) -> None:
    torch.manual_seed(0)
    sender = RoutedExperts(256, 128, [0, 3, 5], dtype=torch.bfloat16, fp8_block=fp8_block)
    receiver = RoutedExperts(256, 128, [1, 5], dtype=torch.bfloat16, fp8_block=fp8_block)
    for module in (sender, receiver):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape).to(p.dtype))
    raw = _expert_as_bytes(sender, 3)
    assert raw.dtype == torch.uint8 and raw.numel() == _expert_bytes({1: sender})
    new = _rebuilt(receiver, [3, 5], {(1, 3): raw}, 1)  # expert 3 arrives, expert 5 is kept
    assert new.expert_ids == [3, 5] and new.fp8_block == fp8_block
    params = list(zip(new.parameters(), sender.parameters(), receiver.parameters(), strict=True))
    assert len(params) == (4 if fp8_block else 2)
    for got, sent, kept in params:
        assert got.dtype == sent.dtype
        assert torch.equal(got[0].view(torch.uint8), sent[1].view(torch.uint8))  # arrived: expert 3
        assert torch.equal(got[1].view(torch.uint8), kept[1].view(torch.uint8))  # kept: expert 5
