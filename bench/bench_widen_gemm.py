"""The AVX2 kernels against torch, side by side in one process: `widen_gemm.linear` (bf16 weights
under fp32 math) vs torch's fp32 `linear` on the widened weight and torch's bf16 `linear`, and
`paged_mla_decode_cpu` vs its gathered torch form, at the bench model's decode shapes.

    python bench/bench_widen_gemm.py [--threads 2] [--rows 1,4,16,32,64]

Each product cycles through 16 weights (more bytes than the caches hold), so it reads memory as
decode does; the figure is the best of 4 rounds of the 25th-percentile call. Rehearse an AVX2-only
host with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` (torch's bf16 then takes its slow path
on a real AVX2 host; under the restriction on an AVX-512 one it may not).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeserve.workers.kernels import avx2, widen_gemm
from moeserve.workers.kernels.mla_decode import paged_mla_decode_torch
from moeserve.workers.kernels.mla_decode_cpu import paged_mla_decode_cpu

# (N, K): expert gate+up, expert down, the head (bench preset: hidden 2048, expert 1408, vocab 8192)
SHAPES = [(2816, 2048), (2048, 1408), (8192, 2048)]


def best_time(fn: Callable[[], object], calls: int = 60, rounds: int = 4) -> float:
    best = float("inf")
    for _ in range(rounds):
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best = min(best, sorted(times)[calls // 4])
    return best


def cycling(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> Callable[[], object]:
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(weights)
        return fn(weights[state["i"]])

    return call


def bench_linear(rows: list[int]) -> None:
    print("linear: ms per product (GB/s of bf16 weight read); ratio = torch fp32 / ours")
    for n, k in SHAPES:
        gen = torch.Generator().manual_seed(n + k)
        bf16 = [torch.randn(n, k, generator=gen).bfloat16() for _ in range(16)]
        fp32 = [w.float() for w in bf16]
        for m in rows:
            x = torch.randn(m, k, generator=gen)
            ours = best_time(cycling(functools.partial(widen_gemm.linear, x), bf16))
            f32 = best_time(cycling(functools.partial(F.linear, x), fp32))
            b16 = best_time(cycling(functools.partial(F.linear, x.bfloat16()), bf16))
            gbs = n * k * 2 / ours / 1e9
            print(
                f"  [{m:>3}, {k}] x [{k}, {n}]: ours {ours * 1e3:6.3f} ({gbs:4.1f} GB/s)  "
                f"torch fp32 {f32 * 1e3:6.3f}  torch bf16 {b16 * 1e3:6.3f}  ratio {f32 / ours:4.2f}x"
            )


def bench_attention() -> None:
    print("absorbed MLA decode, 16 heads, C 512 + R 64, fp32 cache in 64-row blocks: ms per layer")
    for batch, context in [(1, 128), (1, 2048), (16, 160), (32, 160)]:
        gen = torch.Generator().manual_seed(batch + context)
        nb = -(-context // 64)
        cache = torch.randn(batch * nb + 8, 64, 576, generator=gen)
        tables = torch.stack([torch.randperm(batch * nb + 8, generator=gen)[:nb] for _ in range(batch)])
        q = torch.randn(batch, 16, 576, generator=gen)
        lens = torch.full((batch,), context)
        inputs = (q, cache, tables, lens, 0.07, 512)
        ours = best_time(functools.partial(paged_mla_decode_cpu, *inputs))
        torch_form = best_time(functools.partial(paged_mla_decode_torch, *inputs))
        print(
            f"  batch {batch:>2}, context {context:>5}: ours {ours * 1e3:6.3f}  "
            f"torch (gather + bmm) {torch_form * 1e3:6.3f}  ratio {torch_form / ours:4.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", default="1,4,16,32,64", help="rows of x (tokens) per product")
    args = parser.parse_args()
    if not avx2.available():
        raise SystemExit(f"bench_widen_gemm: {avx2.why_unavailable()}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    bench_linear([int(r) for r in args.rows.split(",")])
    bench_attention()


if __name__ == "__main__":
    main()
