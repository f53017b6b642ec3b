"""Decode benchmark: moeserve vs transformers on the same checkpoint, same run, printed as ratios.

Model: the `bench` preset (DeepSeek-V2-Lite attention trimmed: hidden 2048, 16 heads, kv_lora 512,
4 layers with the first dense, 16 routed experts top-6 + 2 shared, vocab 8192), bf16.
Prints decode tokens/s at batch 1, 8, 32 (128-token prompts, 128 new tokens), KV-cache bytes per
token of each system, the batch-1 roofline (active weight bytes per token / measured memory
bandwidth), and per-token decode time after a 2,048-token prompt against after 128.

    python bench/bench_decode.py [--batches 1,8,32] [--new-tokens 128] [--long-prompt 2048]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from moeserve.workers.model.batch import ForwardBatch, SequenceStep
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.loader import load_model
from moeserve.workers.model.random_checkpoint import PRESETS, write_random_checkpoint
from moeserve.workers.model.transformer import Transformer
from moeserve.workers.offline.generate import make_cache

CACHE_DIR = Path.home() / ".cache" / "moeserve" / "bench-model"


def bench_checkpoint() -> Path:
    if not (CACHE_DIR / "model.safetensors").exists():
        write_random_checkpoint(CACHE_DIR, PRESETS["bench"], torch.bfloat16, seed=0, std=0.02)
    return CACHE_DIR


def prompts(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(
        2, vocab, (batch, length), generator=torch.Generator().manual_seed(batch * 7 + length)
    )


def ours_decode(
    model: Transformer, ids: torch.Tensor, new_tokens: int, block_size: int = 64
) -> tuple[float, int]:
    """Seconds per decode step (prefill excluded) and cache bytes per token."""
    b, n = ids.shape
    cache = make_cache(model, [n + new_tokens] * b, block_size)
    seqs = [cache.new_sequence() for _ in range(b)]
    pending = [row.tolist() for row in ids]
    elapsed = 0.0
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
        if step > 0:  # step 0 is the prefill
            elapsed += time.perf_counter() - t0
    return elapsed / new_tokens, cache.bytes_per_token


@torch.inference_mode()
def hf_decode(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    """The same loop through transformers' own KV cache."""
    out = model(ids, use_cache=True)
    cache = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    per_step = (time.perf_counter() - t0) / new_tokens
    cached_tokens = ids.shape[0] * (ids.shape[1] + new_tokens)
    total = sum(t.numel() * t.element_size() for t in _cache_tensors(cache))
    return per_step, total // cached_tokens


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument("--long-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import DeepseekV2ForCausalLM

    path = bench_checkpoint()
    ours = load_model(path, torch.bfloat16, max_positions=args.long_prompt + args.long_new_tokens + 8)
    hf = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    cfg = ours.config
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, bf16, bench preset")
    warm = prompts(2, 16, cfg.vocab_size)  # first calls pay one-off kernel set-up: keep them out
    ours_decode(ours, warm, 4)
    hf_decode(hf, warm, 4)
    print(f"{'batch':>5} {'moeserve tok/s':>15} {'transformers tok/s':>19} {'ratio':>6}")
    kv_ours = kv_hf = 0
    ours_b1 = 0.0
    for b in [int(x) for x in args.batches.split(",")]:
        ids = prompts(b, args.prompt, cfg.vocab_size)
        # best of `--repeats` runs: the machine is shared, the minimum is the least disturbed
        t_ours, kv_ours = min(ours_decode(ours, ids, args.new_tokens) for _ in range(args.repeats))
        t_hf, kv_hf = min(hf_decode(hf, ids, args.new_tokens) for _ in range(args.repeats))
        if b == 1:
            ours_b1 = 1 / t_ours
        print(f"{b:>5} {b / t_ours:>15.1f} {b / t_hf:>19.1f} {t_hf / t_ours:>6.2f}")
    print(f"KV-cache bytes/token (all layers): moeserve {kv_ours}, transformers {kv_hf}")
    weight_bytes = active_weight_bytes(cfg, ours)
    bw = memory_bandwidth()
    roofline = bw / weight_bytes
    print(
        f"batch-1 roofline: {weight_bytes / 1e6:.1f} MB active weights/token, bandwidth {bw / 1e9:.1f} GB/s "
        f"-> {roofline:.1f} tok/s; moeserve reaches {ours_b1 / roofline:.0%}"
    )
    # The machine's bandwidth drifts (shared host): pair each measurement with a decode run.
    ids = prompts(1, args.prompt, cfg.vocab_size)
    print("paired batch-1 runs (bandwidth, torch GEMV floor and decode measured back to back):")
    for _ in range(args.repeats):
        bw = memory_bandwidth()
        floor = gemv_floor(cfg, ours)
        step = ours_decode(ours, ids, args.new_tokens)[0]
        print(
            f"  bandwidth {bw / 1e9:5.1f} GB/s -> roofline {bw / weight_bytes:6.1f} tok/s; "
            f"GEMV floor {floor * 1e3:5.2f} ms ({weight_bytes / floor / 1e9:4.1f} GB/s, "
            f"{weight_bytes / floor / bw:.0%} of roofline by itself); "
            f"moeserve step {step * 1e3:5.2f} ms = {1 / step:5.1f} tok/s, "
            f"{weight_bytes / step / bw:.0%} of roofline, above the floor {(step - floor) * 1e3:.2f} ms"
        )
    print(f"per-token decode time at batch 1 after {args.prompt} vs {args.long_prompt} prompt tokens:")
    for label, fn in (
        ("moeserve", lambda i: ours_decode(ours, i, args.long_new_tokens)[0]),
        ("transformers", lambda i: hf_decode(hf, i, args.long_new_tokens)[0]),
    ):
        short = min(fn(prompts(1, args.prompt, cfg.vocab_size)) for _ in range(args.repeats))
        long = min(fn(prompts(1, args.long_prompt, cfg.vocab_size)) for _ in range(args.repeats))
        print(f"  {label:>12}: {short * 1e3:.1f} ms -> {long * 1e3:.1f} ms ({long / short:.2f}x)")


if __name__ == "__main__":
    main()
