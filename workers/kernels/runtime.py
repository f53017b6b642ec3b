"""Where the Triton kernels come from, and how they run on CPU tensors.

Kernel bodies live in `*_triton.py` modules, imported on first launch: the model never imports
Triton unless it launches a kernel (a CPU-only torch wheel ships without Triton, and the CPU path
uses none). Triton decides between compiling and interpreting when `@triton.jit` decorates a
function, its own library functions included, i.e. when Triton is first imported: a process that
runs kernels on CPU tensors must have `TRITON_INTERPRET=1` in its environment from its start
(the kernel tests run their checks in such a child process; see tests/kernels/interpreter.py).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

import torch

INSTALL_TRITON = "pip install triton (the Linux x86-64 torch wheels from PyPI already depend on it)"


class KernelUnavailable(RuntimeError):
    """A kernel cannot run here; the message says what is missing."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_module(name: str) -> ModuleType:
    """moeserve.workers.kernels.<name> (the jitted kernel bodies), importing Triton on first use."""
    if not triton_available():
        raise KernelUnavailable(f"the Triton kernels need the `triton` package: {INSTALL_TRITON}")
    return importlib.import_module(f"moeserve.workers.kernels.{name}")


def is_interpreted(kernel: Any) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def check_runnable(kernel: Any, device: torch.device) -> None:
    """CPU tensors need the interpreter: a compiled kernel would hand their host pointers to a GPU."""
    if device.type != "cuda" and not is_interpreted(kernel):
        raise KernelUnavailable(
            f"Triton kernel {kernel.__name__} got {device} tensors: on the CPU Triton kernels run only "
            "under Triton's interpreter; set TRITON_INTERPRET=1 before triton is first imported"
        )


def dot_dtype(dtype: torch.dtype, kernel: Any) -> Any:
    """The dtype the kernels feed to `tl.dot` for inputs of `dtype`.

    Compiled, that is the input dtype (bf16 and fp16 on tensor cores, accumulating in fp32).
    Triton's interpreter (3.9) multiplies bf16 tiles as their raw 16-bit integer patterns, so
    there tiles are widened to fp32 first; a bf16 x bf16 product is exact in fp32, so the sums are
    the same up to summation order.
    """
    import triton.language as tl

    if dtype == torch.float32 or is_interpreted(kernel):
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision: exact fp32 products for fp32 models (not TF32), as torch's
    default CUDA matmul computes them and the fp32 GPU tests expect; ignored for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
