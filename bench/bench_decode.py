"""Decode benchmark: moeserve vs transformers (and vLLM's CPU build with --peer vllm) on the same
checkpoint, each system in its own fresh process, one after another, printed as ratios.

Model: the `bench` preset (DeepSeek-V2-Lite attention trimmed: hidden 2048, 16 heads, kv_lora 512,
4 layers with the first dense, 16 routed experts top-6 + 2 shared, vocab 8192), bf16.
Per system: decode tokens/s at each batch (128-token prompts, greedy; time per step between the
16th and 80th new token), time to first token, and per-token decode time after a 2,048-token
prompt against after 128 (`--long-new-tokens` steps, also past the first `--skip-tokens`).
moeserve also prints its KV-cache bytes per token, the batch-1 roofline (active weight bytes per
token / measured memory bandwidth) and the torch GEMV floor.
moeserve runs with `--dtype` (default auto: the policy of `moeserve generate`, printed), the peers
in bf16. Every figure is labelled with the CPU capability torch dispatched on; rehearse an
AVX2-only host on an AVX-512 one with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`.

    python bench/bench_decode.py [--batches 1,16,32] [--peer vllm] [--threads 2] [--dtype auto]

vLLM runs from its own venv (`bash bench/setup_vllm_cpu.sh`, default /work/peer-vllm; see
bench/vllm_peer.py), in its default compiled mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from moeserve.workers.model.batch import ForwardBatch, SequenceStep
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.dtype_policy import DTYPE_NAMES, resolve_dtype
from moeserve.workers.model.loader import load_model
from moeserve.workers.model.random_checkpoint import PRESETS, write_random_checkpoint
from moeserve.workers.model.transformer import Transformer
from moeserve.workers.offline.generate import make_cache

CACHE_DIR = Path.home() / ".cache" / "moeserve" / "bench-model"
VLLM_PEER = Path(__file__).with_name("vllm_peer.py")
RESULT = "RESULT "  # a child's last stdout line: RESULT {json}


def bench_checkpoint() -> Path:
    if not (CACHE_DIR / "model.safetensors").exists():
        write_random_checkpoint(CACHE_DIR, PRESETS["bench"], torch.bfloat16, seed=0, std=0.02)
    return CACHE_DIR


def prompts(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(
        2, vocab, (batch, length), generator=torch.Generator().manual_seed(batch * 7 + length)
    )


def ours_decode(
    model: Transformer, ids: torch.Tensor, new_tokens: int, block_size: int = 64, skip: int = 0
) -> tuple[float, int, float]:
    """Seconds per decode step over steps skip+1..new_tokens (prefill and the first `skip` steps
    excluded), cache bytes per token, and the prefill's seconds (time to first token)."""
    b, n = ids.shape
    cache = make_cache(model, [n + new_tokens] * b, block_size)
    seqs = [cache.new_sequence() for _ in range(b)]
    pending = [row.tolist() for row in ids]
    elapsed = ttft = 0.0
    for step in range(new_tokens + 1):
        t0 = time.perf_counter()
        steps = []
        for seq, toks in zip(seqs, pending, strict=True):
            seq.reserve(cache.allocator, len(toks))
            steps.append(SequenceStep(toks, seq.num_tokens, seq.blocks))
        logits = model(ForwardBatch.build(steps, block_size), cache)
        nxt = logits.argmax(-1).tolist()
        for seq, toks in zip(seqs, pending, strict=True):
            seq.num_tokens += len(toks)
        pending = [[t] for t in nxt]
        if step == 0:
            ttft = time.perf_counter() - t0
        elif step > skip:
            elapsed += time.perf_counter() - t0
    return elapsed / (new_tokens - skip), cache.bytes_per_token, ttft


@torch.inference_mode()
def hf_decode(
    model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, skip: int = 0
) -> tuple[float, int, float]:
    """The same loop through transformers' own KV cache."""
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    cache = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    ttft = time.perf_counter() - t0
    for step in range(new_tokens):
        if step == skip:
            t0 = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    per_step = (time.perf_counter() - t0) / (new_tokens - skip)
    cached_tokens = ids.shape[0] * (ids.shape[1] + new_tokens)
    total = sum(t.numel() * t.element_size() for t in _cache_tensors(cache))
    return per_step, total // cached_tokens, ttft


def _cache_tensors(cache: object) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                tensors.append(t)
    return tensors


def active_weight_bytes(config: ModelConfig, model: Transformer) -> int:
    """Bytes of weights one decode token reads: all but the embedding table and unchosen experts."""
    total = 0
    for name, p in model.named_parameters():
        if name == "embed.weight":
            total += config.hidden_size * p.element_size()
        elif ".ffn.experts." in name:
            total += p.numel() // config.n_routed_experts * config.num_experts_per_tok * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


@torch.inference_mode()
def gemv_floor(config: ModelConfig, model: Transformer, repeats: int = 20) -> float:
    """Seconds torch's own matmul kernels take to read one token's active weights once (one
    matrix-vector product per weight matrix, top-k random experts per MoE layer): the floor of any
    PyTorch decode step at batch 1 on this machine; a step's time above it is per-op overhead."""
    gen = torch.Generator().manual_seed(0)
    matrices: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if name == "embed.weight" or p.dim() < 2:
            continue
        if ".ffn.experts." in name:
            chosen = torch.randperm(config.n_routed_experts, generator=gen)[: config.num_experts_per_tok]
            matrices.extend(p[int(e)] for e in chosen)
        else:
            matrices.append(p)
    inputs = [torch.ones(1, w.shape[1], dtype=w.dtype) for w in matrices]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, w in zip(inputs, matrices, strict=True):
            torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth() -> float:
    """Read bandwidth (bytes/s) of a sum over 1 GiB, best of 5."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def short_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def run_worker(args: argparse.Namespace) -> dict[str, object]:
    """One system in this process: decode tok/s per batch, TTFT, the short/long-context step."""
    torch.set_num_threads(args.threads)
    path = bench_checkpoint()
    batches = [int(x) for x in args.batches.split(",")]
    skip, new = args.skip_tokens, args.skip_tokens + args.timed_tokens
    max_positions = args.long_prompt + new + 8
    if args.worker == "moeserve":
        choice = resolve_dtype(args.dtype, path, torch.device("cpu"))
        weights = None if args.weights == "auto" else DTYPE_NAMES[args.weights]
        given = f"; --weights {args.weights}" if weights else ""
        print(f"moeserve: {choice.describe()}{given}", flush=True)
        model = load_model(path, choice.compute, max_positions=max_positions, matmul_weights=weights)
        dtype_name = short_name(choice.compute)
        if model.head.weight.dtype != choice.compute:  # bf16 weights widened in the products
            dtype_name += "/" + short_name(model.head.weight.dtype) + "w"

        def decode(ids: torch.Tensor, n: int, k: int) -> tuple[float, int, float]:
            return ours_decode(model, ids, n, skip=k)
    else:
        from transformers import DeepseekV2ForCausalLM

        hf = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        dtype_name = "bfloat16"

        def decode(ids: torch.Tensor, n: int, k: int) -> tuple[float, int, float]:
            return hf_decode(hf, ids, n, skip=k)

    vocab = PRESETS["bench"]["vocab_size"]
    decode(prompts(2, 16, vocab), 4, 0)  # first calls pay one-off kernel set-up: keep them out
    result: dict[str, object] = {
        "system": args.worker,
        "dtype": dtype_name,
        "capability": capability(),
        "threads": torch.get_num_threads(),
        "tok_s": {},
        "ttft_s": {},
    }
    kv = 0
    for b in batches:
        ids = prompts(b, args.prompt, vocab)
        # best of `--repeats` runs: the machine is shared, the minimum is the least disturbed
        t, kv, ttft = min(decode(ids, new, skip) for _ in range(args.repeats))
        result["tok_s"][str(b)] = b / t  # type: ignore[index]
        if b == 1:
            result["ttft_s"][str(args.prompt)] = ttft  # type: ignore[index]
        print(f"  {args.worker} batch {b}: {b / t:.1f} tok/s ({t * 1e3:.1f} ms/step)", flush=True)
    result["kv_bytes_per_token"] = kv
    short = min(
        decode(prompts(1, args.prompt, vocab), skip + args.long_new_tokens, skip)[0]
        for _ in range(args.repeats)
    )
    # both steps past the first `skip` new tokens, as the batch figures: the steps right after a
    # 2,048-token prefill run on a cold cache and would count the prefill's after-effects
    runs = [
        decode(prompts(1, args.long_prompt, vocab), skip + args.long_new_tokens, skip)
        for _ in range(args.repeats)
    ]
    result["short_step_s"], result["long_step_s"] = short, min(r[0] for r in runs)
    result["ttft_s"][str(args.long_prompt)] = min(r[2] for r in runs)  # type: ignore[index]
    if args.worker == "moeserve" and args.roofline:
        print_roofline(model, args)
    return result


def print_roofline(model: Transformer, args: argparse.Namespace) -> None:
    cfg = model.config
    weight_bytes = active_weight_bytes(cfg, model)
    ids = prompts(1, args.prompt, cfg.vocab_size)
    print("  paired batch-1 runs (bandwidth, torch GEMV floor and decode measured back to back):")
    for _ in range(args.repeats):
        bw = memory_bandwidth()
        floor = gemv_floor(cfg, model)
        step = ours_decode(model, ids, args.skip_tokens + args.timed_tokens, skip=args.skip_tokens)[0]
        print(
            f"    {weight_bytes / 1e6:.1f} MB active weights/token; bandwidth {bw / 1e9:5.1f} GB/s -> "
            f"roofline {bw / weight_bytes:6.1f} tok/s; GEMV floor {floor * 1e3:5.2f} ms "
            f"({weight_bytes / floor / bw:.0%} of roofline by itself); moeserve step {step * 1e3:5.2f} ms "
            f"= {1 / step:5.1f} tok/s, {weight_bytes / step / bw:.0%} of roofline"
        )


def worker_command(system: str, args: argparse.Namespace) -> list[str]:
    batches = args.batches if system == "moeserve" else (args.peer_batches or args.batches)
    common = [
        "--batches", batches, "--prompt", str(args.prompt), "--skip-tokens", str(args.skip_tokens),
        "--timed-tokens", str(args.timed_tokens), "--long-prompt", str(args.long_prompt),
        "--long-new-tokens", str(args.long_new_tokens), "--threads", str(args.threads),
        "--repeats", str(args.repeats),
    ]  # fmt: skip
    if system == "vllm":
        return [args.vllm_python, str(VLLM_PEER), "--model", str(bench_checkpoint()), *common]
    extra = ["--dtype", args.dtype, "--weights", args.weights] + ([] if args.roofline else ["--no-roofline"])
    return [sys.executable, __file__, "--worker", system, *common, *extra]


def run_system(system: str, args: argparse.Namespace) -> dict[str, object] | None:
    """One system's child process (nothing else of ours runs meanwhile); its lines pass through."""
    print(f"== {system}: {' '.join(worker_command(system, args))}", flush=True)
    proc = subprocess.Popen(worker_command(system, args), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    result = None
    for line in proc.stdout:
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT) :])
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0 or result is None:
        print(f"== {system}: failed (exit {proc.returncode}); left out of the table", flush=True)
        return None
    return result


def print_table(results: list[dict[str, object]], args: argparse.Namespace) -> None:
    batches = args.batches.split(",")
    ours = results[0]
    print(
        f"load average {os.getloadavg()[0]:.1f} (uptime), {args.threads} threads each, one system at a time"
    )
    head = " ".join(f"{'b' + b + ' tok/s':>10}" for b in batches)
    print(f"{'system':>12} {'dtype':>10} {'CPU':>7} {head} {'TTFT ' + str(args.prompt):>9} "
          f"{'TTFT ' + str(args.long_prompt):>10} {'step ' + str(args.prompt):>9} "
          f"{'step ' + str(args.long_prompt):>10} {'long/short':>10}")  # fmt: skip
    for r in results:
        tok, ttft = r["tok_s"], r["ttft_s"]
        assert isinstance(tok, dict) and isinstance(ttft, dict)
        short, long = float(r["short_step_s"]), float(r["long_step_s"])  # type: ignore[arg-type]
        cells = " ".join(f"{tok[b]:>10.1f}" if b in tok else f"{'-':>10}" for b in batches)
        print(
            f"{r['system']:>12} {r['dtype']:>10} {r['capability']:>7} {cells} "
            f"{ttft[str(args.prompt)]:>8.2f}s {ttft[str(args.long_prompt)]:>9.2f}s "
            f"{short * 1e3:>7.1f}ms {long * 1e3:>8.1f}ms {long / short:>9.2f}x"
        )
    ours_tok, ours_ttft = ours["tok_s"], ours["ttft_s"]
    assert isinstance(ours_tok, dict) and isinstance(ours_ttft, dict)
    for r in results[1:]:
        tok, ttft = r["tok_s"], r["ttft_s"]
        assert isinstance(tok, dict) and isinstance(ttft, dict)
        ratios = ", ".join(f"b{b} {ours_tok[b] / tok[b]:.2f}x" for b in batches if b in tok)
        ttfts = ", ".join(f"{n} {ttft[n] / ours_ttft[n]:.2f}x" for n in ttft)
        step = float(r["long_step_s"]) / float(ours["long_step_s"])  # type: ignore[arg-type]
        print(f"moeserve / {r['system']}: tok/s {ratios}; TTFT (theirs/ours) {ttfts}; "
              f"step after {args.long_prompt} (theirs/ours) {step:.2f}x")  # fmt: skip
    print("KV-cache bytes/token (all layers): " + ", ".join(
        f"{r['system']} {r.get('kv_bytes_per_token', '?')}" for r in results))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,16,32")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--skip-tokens", type=int, default=16, help="new tokens before timing starts")
    parser.add_argument("--timed-tokens", type=int, default=64, help="new tokens timed (16th-80th)")
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument(
        "--long-new-tokens", type=int, default=32, help="steps timed after each prompt of the 128/2,048 pair"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peer-batches", default=None, help="the peers' batches (default: --batches)")
    parser.add_argument("--dtype", default="auto", help="moeserve's dtype: auto (default) or a dtype name")
    parser.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="moeserve's linear/expert weight dtype under fp32 compute: auto (the policy), or a candidate",
    )
    parser.add_argument("--peer", action="append", default=[], choices=["vllm"], help="also run vLLM")
    parser.add_argument("--systems", default="moeserve,transformers", help="which of ours/transformers")
    parser.add_argument("--vllm-python", default="/work/peer-vllm/bin/python", help="the peer venv's python")
    parser.add_argument("--no-roofline", dest="roofline", action="store_false")
    parser.add_argument("--worker", choices=["moeserve", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(RESULT + json.dumps(run_worker(args)), flush=True)
        return
    bench_checkpoint()  # written once, before any system starts
    print(f"torch {torch.__version__}, CPU capability {capability()}, bench preset (bf16 checkpoint)")
    systems = [s for s in args.systems.split(",") if s] + args.peer
    results = [r for s in systems if (r := run_system(s, args)) is not None]
    if results and results[0]["system"] == "moeserve":
        print_table(results, args)
    elif results:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
