"""FP8 weights benchmark: bf16 vs fp8 block-scaled weights on the benchmark model, decode tok/s.

The `bench` preset checkpoint (bf16, as bench_decode.py writes it) is quantized by
`quantize_checkpoint` (DeepSeek-V3's format), then decoded three ways with bf16 activations:
  bf16            the bf16 checkpoint
  fp8-dequantize  the fp8 checkpoint dequantized to bf16 once at load (`--fp8-weights dequantize`)
  fp8-keep        the fp8 checkpoint kept fp8, dequantized per block inside each matmul (`keep`)
Prints, per batch size, seconds per decode step and tok/s of each, the keep/dequantize and
fp8/bf16 ratios, weight bytes in memory and load times. The CPU keep path converts fp8 in torch ops
(no fused fp8 kernel on the CPU), so it runs fewer steps: `--keep-new-tokens`.

    python bench/bench_fp8.py [--batches 1,16] [--new-tokens 32] [--keep-new-tokens 4] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_decode import bench_checkpoint, ours_decode, prompts

from moeserve.workers.model.loader import load_model
from moeserve.workers.model.quantize_fp8 import quantize_checkpoint
from moeserve.workers.model.transformer import Transformer


def weight_bytes(model: Transformer) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def cpu_capability() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--keep-new-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16_path = bench_checkpoint()
    fp8_path = Path(tempfile.gettempdir()) / "moeserve-bench-fp8"
    if not (fp8_path / "model.safetensors").exists():
        quantize_checkpoint(bf16_path, fp8_path)
    print(f"cpu: {cpu_capability()}; threads {args.threads}; load average {os.getloadavg()}")
    variants = {
        "bf16": (bf16_path, "dequantize", args.new_tokens),
        "fp8-dequantize": (fp8_path, "dequantize", args.new_tokens),
        "fp8-keep": (fp8_path, "keep", args.keep_new_tokens),
    }
    models: dict[str, Transformer] = {}
    for name, (path, mode, _) in variants.items():
        t0 = time.perf_counter()
        models[name] = load_model(path, torch.bfloat16, fp8_weights=mode)  # type: ignore[arg-type]
        mib = weight_bytes(models[name]) / 2**20
        print(f"{name:15s} load {time.perf_counter() - t0:6.2f} s, weights {mib:7.1f} MiB")
    vocab = models["bf16"].config.vocab_size
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = prompts(batch, args.prompt, vocab)
        step: dict[str, float] = {}
        for name, (_, _, new_tokens) in variants.items():
            ours_decode(models[name], ids[:, :8], 2)  # warm-up
            step[name] = ours_decode(models[name], ids, new_tokens)[0]
            print(
                f"batch {batch:3d} {name:15s} {step[name] * 1e3:9.1f} ms/step {batch / step[name]:9.1f} tok/s"
            )
        keep_ratio, deq_ratio = (
            step["fp8-dequantize"] / step["fp8-keep"],
            step["bf16"] / step["fp8-dequantize"],
        )
        print(
            f"batch {batch:3d} tok/s ratios: keep/dequantize {keep_ratio:.3f}, dequant/bf16 {deq_ratio:.3f}"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
