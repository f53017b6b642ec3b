"""`--dtype auto`: the compute and weight-storage dtypes for a checkpoint on this host.

The rule, from measurements of the decode step on the bench checkpoint (bench/bench_decode.py,
README "Dtypes on the CPU"):
- a CUDA device computes in the checkpoint's dtype;
- a CPU with native 16-bit matmuls (AVX-512 / AMX on x86; see `kernels/cpu_capability.py`)
  computes bf16/fp16 checkpoints in their own dtype, today's fast path;
- a CPU without them (AVX2-only x86) computes in fp32: torch's bf16 GEMV/GEMM/bmm there are
  several times slower than fp32 ones that read twice the bytes. A bf16 checkpoint's linear-layer
  and expert weights stay bf16 there and are widened in registers inside each product
  (`kernels/widen_gemm.py`: fp32 math on half the bytes, 1.4-3x torch's fp32 products at decode
  sizes); without that kernel (not built, or no AVX2 + FMA) they are converted to fp32 at load;
- fp32 checkpoints stay fp32 everywhere (nothing is ever narrowed behind the user's back).
An explicit `--dtype` wins over the compute dtype; the weights of an fp32 computation follow the
same rule (`matmul_weight_dtype`: the values are the checkpoint's either way). The policy decides;
the loader asks `matmul_weight_dtype` too, so every rank of an instance holds what this says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moeserve.workers.kernels import widen_gemm
from moeserve.workers.kernels.cpu_capability import CpuCapability, cpu_capability

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_PROBE_TENSOR = "model.embed_tokens.weight"  # always present, never quantized


@dataclass(frozen=True)
class DtypeChoice:
    """What a model is loaded as, and why."""

    checkpoint: torch.dtype
    """The dtype the checkpoint's weights are stored in."""
    compute: torch.dtype
    """Activations, KV cache and matmul inputs."""
    weights: torch.dtype
    """Weights as held in memory (the loader converts from `checkpoint` at load)."""
    reason: str

    def describe(self) -> str:
        def name(d: torch.dtype) -> str:
            return str(d).removeprefix("torch.")

        converted = " (converted at load)" if self.weights != self.checkpoint else ""
        return (
            f"dtype: checkpoint {name(self.checkpoint)} -> compute {name(self.compute)}, "
            f"weights {name(self.weights)}{converted}; {self.reason}"
        )


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The checkpoint's weight dtype: `torch_dtype` / `dtype` of config.json, else the embedding's
    dtype in the safetensors header. Unknown or non-float dtypes count as fp32."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        if isinstance(config.get(key), str) and config[key] in DTYPE_NAMES:
            return DTYPE_NAMES[config[key]]
    index = path / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"].get(_PROBE_TENSOR) if index.exists() else None
    shard = path / (file or "model.safetensors")
    if shard.exists():
        with safe_open(str(shard), framework="pt") as f:
            if _PROBE_TENSOR in f.keys():  # noqa: SIM118
                return _SAFETENSORS.get(f.get_slice(_PROBE_TENSOR).get_dtype(), torch.float32)
    return torch.float32


def is_quantized(path: str | Path) -> bool:
    """Whether config.json declares a quantized (fp8 block) checkpoint."""
    return "quantization_config" in json.loads((Path(path) / "config.json").read_text())


def choose_dtype(
    checkpoint: torch.dtype, device: torch.device, cap: CpuCapability | None = None, quantized: bool = False
) -> DtypeChoice:
    """The policy above for a checkpoint stored in `checkpoint` (`quantized`: fp8) on `device`."""
    if checkpoint == torch.float32:
        return DtypeChoice(checkpoint, checkpoint, checkpoint, "fp32 checkpoint: kept as stored")
    if device.type != "cpu":
        return DtypeChoice(checkpoint, checkpoint, checkpoint, f"{device.type}: the checkpoint's dtype")
    cap = cap or cpu_capability()
    if not _native(cap, checkpoint):
        weights = matmul_weight_dtype(checkpoint, torch.float32, device, quantized, cap)
        how = (
            "bf16 weights widened to fp32 in registers (widen_gemm)"
            if weights == torch.bfloat16
            else "fp32 matmuls" + _without_kernel(checkpoint)
        )
        reason = f"{cap.describe()}: {how} beat torch's emulated 16-bit ones here"
        return DtypeChoice(checkpoint, torch.float32, weights, reason)
    return DtypeChoice(checkpoint, checkpoint, checkpoint, f"{cap.describe()}: 16-bit matmuls are native")


def matmul_weight_dtype(
    checkpoint: torch.dtype,
    compute: torch.dtype,
    device: torch.device,
    quantized: bool = False,
    cap: CpuCapability | None = None,
) -> torch.dtype:
    """The dtype the linear layers' and routed experts' weights are held in: the checkpoint's bf16
    under fp32 compute on a CPU without native bf16 matmuls where the widening kernel runs (the same
    values at half the bytes); `compute` otherwise. `quantized`: an fp8 checkpoint (its dequantized
    values are not bf16 ones)."""
    if quantized or checkpoint != torch.bfloat16 or compute != torch.float32 or device.type != "cpu":
        return compute
    cap = cap or cpu_capability()
    return torch.bfloat16 if not cap.native_bf16 and widen_gemm.available() else compute


def _without_kernel(checkpoint: torch.dtype) -> str:
    if checkpoint != torch.bfloat16 or widen_gemm.available():
        return ""
    return f" on weights converted at load ({widen_gemm.why_unavailable()})"


def _native(cap: CpuCapability, dtype: torch.dtype) -> bool:
    return cap.native_bf16 if dtype == torch.bfloat16 else cap.native_fp16


def resolve_dtype(requested: str, path: str | Path, device: torch.device) -> DtypeChoice:
    """`--dtype` as given: "auto" applies the policy; a dtype name is taken as it is."""
    stored, quantized = checkpoint_dtype(path), is_quantized(path)
    if requested == "auto":
        return choose_dtype(stored, device, quantized=quantized)
    if requested not in DTYPE_NAMES:
        raise ValueError(f"dtype: expected auto or one of {', '.join(DTYPE_NAMES)}, got {requested!r}")
    chosen = DTYPE_NAMES[requested]
    weights = matmul_weight_dtype(stored, chosen, device, quantized)
    return DtypeChoice(stored, chosen, weights, "given explicitly with --dtype")
