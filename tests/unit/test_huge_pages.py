"""Weights on transparent huge pages: same values, 2 MiB aligned, and really huge-page backed where
the kernel's THP mode allows it (read from sysfs, so the assertion matches the host)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from moeserve.workers.model.huge_pages import HUGE_PAGE, allocate_on_huge_pages, on_huge_pages

pytestmark = pytest.mark.unit

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_kib_backing(t: torch.Tensor) -> int:
    """AnonHugePages (KiB) of the mapping that holds t's first byte, from /proc/self/smaps."""
    address = t.data_ptr()
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span[1], 16) <= address < int(span[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds address {address:#x}")


def thp_allowed() -> bool:
    mode = re.search(r"\[(\w+)\]", THP_MODE.read_text())
    assert mode, f"cannot read the THP mode from {THP_MODE}"
    return mode[1] in ("always", "madvise")


def test_copy_keeps_values_and_is_aligned_and_backed_by_huge_pages() -> None:
    src = torch.randn(3, 1024, 1024).to(torch.bfloat16)[:, :, :1000]  # 6 MB, not contiguous
    out = on_huge_pages(src)
    assert torch.equal(out, src) and out.is_contiguous() and out.dtype == torch.bfloat16
    assert out.data_ptr() % HUGE_PAGE == 0
    huge = huge_kib_backing(out)
    if thp_allowed():
        assert huge >= 2048, f"expected huge pages under THP mode {THP_MODE.read_text().strip()!r}"
    else:
        assert huge == 0


def test_small_and_non_cpu_tensors_fall_back_to_a_contiguous_tensor() -> None:
    small = torch.arange(12.0).view(3, 4).t()
    out = on_huge_pages(small)
    assert torch.equal(out, small) and out.is_contiguous()
    meta = torch.empty(4096, 4096, device="meta")
    assert on_huge_pages(meta).device.type == "meta"


def test_allocate_moves_large_parameters_and_keeps_shared_ones_shared() -> None:
    model = nn.Sequential(nn.Linear(2048, 1024, bias=False), nn.Linear(8, 8))
    model.append(model[0])  # one parameter reachable twice
    small_before = model[1].weight.data_ptr()
    allocate_on_huge_pages(model)
    big = model[0].weight
    assert isinstance(big, nn.Parameter) and big.shape == (1024, 2048)
    assert big.data_ptr() % HUGE_PAGE == 0 and model[2].weight is big
    assert model[1].weight.data_ptr() == small_before  # below 2 MiB: left alone
    with torch.no_grad():
        big.fill_(1.0)  # the new storage is writable and read back through the module
        assert torch.equal(model[2](torch.ones(1, 2048)), torch.full((1, 1024), 2048.0))
