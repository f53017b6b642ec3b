"""The compiled CPU kernels of the AVX2 path (`csrc/avx2_kernels.c`, built by `pip install`; optional).

Hosts without native bf16 matmuls (AVX2-only x86) compute bf16 checkpoints in fp32. Two kernels make
that fast: `widen_gemm.linear` (bf16 weights widened in registers) and `mla_decode_cpu` (the absorbed
MLA decode read in place from the paged fp32 cache). This module only says whether they can run.
"""

from __future__ import annotations

import functools
from types import ModuleType

try:
    from moeserve.workers.kernels import _avx2_kernels as _ext
except ImportError:  # not built (no C compiler at install): the torch paths instead
    _ext = None

ext: ModuleType | None = _ext


@functools.cache
def available() -> bool:
    """Whether the kernels are built and this CPU runs them (x86 with AVX2 + FMA)."""
    return ext is not None and bool(ext.supported())


def why_unavailable() -> str:
    if ext is None:
        return "the avx2_kernels extension is not built (pip install found no C compiler)"
    return "" if available() else "this CPU has no AVX2 + FMA"
