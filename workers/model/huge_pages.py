"""Weights on transparent huge pages (CPU).

Batch-1 decode streams every active weight from memory once per token. With 4 KiB pages that stream
takes a TLB miss every 4 KiB; on 2 MiB pages it takes one per 2 MiB, and the same matrix-vector
products run about 5 % faster here (`bench/bench_decode.py`). Most Linux hosts set THP to `madvise`,
so memory gets huge pages only when asked for: these helpers map anonymous memory, align it to 2 MiB
and `madvise(MADV_HUGEPAGE)` it. Elsewhere (another OS, a GPU tensor, a small tensor) they fall back
to ordinary allocation, so callers never need to check.
"""

from __future__ import annotations

import ctypes
import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20


def _supported(device: torch.device, nbytes: int) -> bool:
    return device.type == "cpu" and nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE")


def empty_on_huge_pages(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor backed by huge-page-advised memory (plain `torch.empty` if small)."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if not _supported(torch.device("cpu"), nbytes):
        return torch.empty(shape, dtype=dtype)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # private: shared anonymous memory is shmem, which THP's `madvise` mode leaves on small pages;
    # one spare huge page to align the start, never touched
    buf = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    offset = -address % HUGE_PAGE
    buf.madvise(mmap.MADV_HUGEPAGE, offset, size)
    # the tensor holds a reference to `buf`: the mapping lives as long as the tensor's storage
    flat = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s values, contiguous, on huge pages where they apply (else `tensor.contiguous()`)."""
    if not _supported(tensor.device, tensor.nbytes):
        return tensor.contiguous()
    out = empty_on_huge_pages(tensor.shape, tensor.dtype)
    out.copy_(tensor)
    return out


def allocate_on_huge_pages(module: nn.Module) -> None:
    """Give every large CPU parameter of `module` fresh, uninitialised huge-page storage (before the
    loader fills it). Parameters shared between modules stay shared: they are one object."""
    for param in module.parameters():
        if _supported(param.device, param.nbytes):
            param.data = empty_on_huge_pages(param.shape, param.dtype)
