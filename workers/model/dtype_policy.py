"""`--dtype auto`: the compute and weight-storage dtypes for a checkpoint on this host.

The rule, from measurements of the decode step on the bench checkpoint (bench/bench_decode.py,
README "Dtypes on the CPU"):
- a CUDA device computes in the checkpoint's dtype;
- a CPU with native 16-bit matmuls (AVX-512 / AMX on x86; see `kernels/cpu_capability.py`)
  computes bf16/fp16 checkpoints in their own dtype, today's fast path;
- a CPU without them (AVX2-only x86) computes in fp32 with the weights converted at load: torch's
  bf16 GEMV/GEMM/bmm there are several times slower than fp32 ones that read twice the bytes;
- fp32 checkpoints stay fp32 everywhere (nothing is ever narrowed behind the user's back).
An explicit `--dtype` wins over all of this. The policy decides; it does not load anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

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


def choose_dtype(
    checkpoint: torch.dtype, device: torch.device, cap: CpuCapability | None = None
) -> DtypeChoice:
    """The policy above for a checkpoint stored in `checkpoint` on `device`."""
    if checkpoint == torch.float32:
        return DtypeChoice(checkpoint, checkpoint, checkpoint, "fp32 checkpoint: kept as stored")
    if device.type != "cpu":
        return DtypeChoice(checkpoint, checkpoint, checkpoint, f"{device.type}: the checkpoint's dtype")
    cap = cap or cpu_capability()
    if not _native(cap, checkpoint):
        reason = f"{cap.describe()}: fp32 matmuls beat torch's emulated 16-bit ones here"
        return DtypeChoice(checkpoint, torch.float32, torch.float32, reason)
    return DtypeChoice(checkpoint, checkpoint, checkpoint, f"{cap.describe()}: 16-bit matmuls are native")


def _native(cap: CpuCapability, dtype: torch.dtype) -> bool:
    return cap.native_bf16 if dtype == torch.bfloat16 else cap.native_fp16


def resolve_dtype(requested: str, path: str | Path, device: torch.device) -> DtypeChoice:
    """`--dtype` as given: "auto" applies the policy; a dtype name is taken as it is."""
    stored = checkpoint_dtype(path)
    if requested == "auto":
        return choose_dtype(stored, device)
    if requested not in DTYPE_NAMES:
        raise ValueError(f"dtype: expected auto or one of {', '.join(DTYPE_NAMES)}, got {requested!r}")
    chosen = DTYPE_NAMES[requested]
    return DtypeChoice(stored, chosen, chosen, "given explicitly with --dtype")
