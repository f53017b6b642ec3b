"""What this CPU can compute fast, as torch's own dispatch sees it.

Two switches decide the speed of 16-bit matmuls on the CPU: ATen's kernel dispatch level
(`torch.backends.cpu.get_cpu_capability()`: AVX2, AVX512, ...) and whether oneDNN, which torch
hands bf16/fp16 `matmul`/`bmm`/`linear` to, has a native path for them. Where it has none (an
AVX2-only x86 host: older Xeons, AMD EPYC before Zen 4, VMs that mask AVX-512), torch's bf16
GEMV, GEMM and bmm fall back to scalar-widening code that is 5-70x slower than fp32 (measured in
bench/bench_decode.py's notes). Both switches follow `ATEN_CPU_CAPABILITY` and
`ONEDNN_MAX_CPU_ISA`, so an AVX-512 host can rehearse an AVX2 one.

This module only reports; `model/dtype_policy.py` decides what to do with it.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch

X86 = {"x86_64", "amd64", "i386", "i686"}


@dataclass(frozen=True)
class CpuCapability:
    """The CPU as torch dispatches on it (restrictions by environment variable included)."""

    dispatch: str
    """`torch.backends.cpu.get_cpu_capability()`: "AVX2", "AVX512", "DEFAULT", "SVE256", ..."""
    native_bf16: bool
    """bf16 matmuls run on a vectorized oneDNN path (AVX512-BF16 / AMX, AVX-512 emulation, or ARM
    bf16), not torch's slow fallback."""
    native_fp16: bool
    """The same for fp16 (AVX512-FP16 / AMX-FP16 on x86)."""
    hardware: tuple[str, ...]
    """bf16/fp16-related instruction sets the silicon has, whatever the dispatch is limited to."""

    def describe(self) -> str:
        flags = ", ".join(self.hardware) or "none"
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        return f"CPU dispatch {self.dispatch}, {bf16} (hardware: {flags})"


@functools.cache
def cpu_capability() -> CpuCapability:
    """This process's CPU capability (fixed for its lifetime: torch reads the environment once)."""
    dispatch = torch.backends.cpu.get_cpu_capability()
    x86 = platform.machine().lower() in X86
    # On x86, oneDNN's bf16 kernels need AVX-512 (native AVX512-BF16/AMX, or emulated with
    # AVX-512BW): below that torch's dispatch and oneDNN both take the slow path.
    vector_ok = dispatch.startswith("AVX512") if x86 else True
    hardware = tuple(
        name
        for name, probe in (
            ("avx512", torch.cpu._is_avx512_supported),
            ("avx512_bf16", torch.cpu._is_avx512_bf16_supported),
            ("amx", torch.cpu._is_amx_tile_supported),
            ("amx_fp16", torch.cpu._is_amx_fp16_supported),
        )
        if x86 and probe()
    )
    return CpuCapability(
        dispatch=dispatch,
        native_bf16=vector_ok and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        native_fp16=vector_ok and bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
        hardware=hardware,
    )


def slow_16bit(dtype: torch.dtype, device: torch.device) -> bool:
    """True where matmuls in `dtype` on `device` take torch's slow CPU fallback."""
    if device.type != "cpu" or dtype == torch.float32:
        return False
    cap = cpu_capability()
    return not (cap.native_bf16 if dtype == torch.bfloat16 else cap.native_fp16)
