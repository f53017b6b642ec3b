"""Expert-parallel decode benchmark: (A, E) = (1, 2) with and without ping-pong vs the single process.

Model: the `bench` preset (hidden 2048, 16 heads, 4 layers with the first dense, 16 routed experts
top-6 + 2 shared, vocab 8192), bf16, written once with `moeserve model init-random --preset bench`.
One run of this script measures, on the same prompts and in fresh processes with one thread each:
- the single-process `generate()`;
- a local world of 1 attention rank + 2 expert ranks (gloo), no split, then ping-pong;
and prints decode tokens/s with ratios to the single process, decode-step time per MoE layer
(router, dispatch, expert compute, combine), bytes through all-to-all per decode step, and each
process's weights and peak resident memory. CPU timings; on a shared machine they are noisy.

    python bench/bench_expert_parallel.py [--model DIR] [--batch 16] [--prompt 32] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.loader import load_model
from moeserve.workers.model.moe import LocalRoutedExecutor, MoE
from moeserve.workers.offline.generate import GenerationSettings, generate
from moeserve.workers.offline.local_world import launch_local
from moeserve.workers.offline.rank import RankResult, Run
from moeserve.workers.parallel.settings import EPSettings

CACHE_DIR = Path.home() / ".cache" / "moeserve" / "bench-model-ep"  # written by init-random
MB = 1e6


def bench_checkpoint(path: Path) -> Path:
    if not (path / "config.json").exists():
        cmd = [sys.executable, "-m", "moeserve.workers.cli.main", "model", "init-random", "--preset", "bench"]
        subprocess.run([*cmd, "--out", str(path), "--dtype", "bfloat16"], check=True)
    return path


def make_prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).tolist()


class TimedLocalExecutor:
    """The single process's routed experts, timed like an expert rank's compute."""

    def __init__(self, local: LocalRoutedExecutor):
        self.local = local
        self.seconds = 0.0

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = self.local(layer, x, ids, w)
        self.seconds += time.perf_counter() - t0
        return y


def single_process(path: Path, prompts: list[list[int]], new_tokens: int, out: Any) -> None:
    """Child process: warm up, then one timed `generate()`; step 0 (the prefill) is reported apart."""
    torch.set_num_threads(1)
    model = load_model(path, torch.bfloat16)
    settings = GenerationSettings(max_tokens=new_tokens, stop_at_eos=False)
    generate(model, prompts[:2], GenerationSettings(max_tokens=2))
    executor = TimedLocalExecutor(model.local_executor())
    steps: list[float] = []
    routed_at_step: list[float] = []
    router = {"seconds": 0.0, "start": 0.0}

    def step_start(*_: Any) -> None:
        steps.append(time.perf_counter())
        routed_at_step.append(executor.seconds)

    def step_end(*_: Any) -> None:
        steps[-1] = time.perf_counter() - steps[-1]

    def gate_start(*_: Any) -> None:
        router["start"] = time.perf_counter()

    def gate_end(*_: Any) -> None:
        if len(steps) > 1:  # decode steps only
            router["seconds"] += time.perf_counter() - router["start"]

    model.register_forward_pre_hook(step_start)
    model.register_forward_hook(step_end)
    for block in model.layers:
        if isinstance(block.ffn, MoE):
            block.ffn.gate.register_forward_pre_hook(gate_start)
            block.ffn.gate.register_forward_hook(gate_end)
    ids = generate(model, prompts, settings, routed=executor)
    out.put(
        {
            "prefill_s": steps[0],
            "decode_s": sum(steps[1:]),
            "decode_steps": len(steps) - 1,
            "decode_tokens": sum(len(t) - 1 for t in ids),
            "routed_s": executor.seconds - routed_at_step[1],
            "router_s": router["seconds"],
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "token_ids": ids,
        }
    )


def run_single(path: Path, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    ctx = mp.get_context("forkserver")
    queue = ctx.Queue()
    proc = ctx.Process(target=single_process, args=(path, prompts, new_tokens, queue))
    proc.start()
    result: dict[str, Any] = queue.get()
    proc.join()
    return result


def common_prefix(got: list[list[int]], ref: list[list[int]]) -> str:
    """How many leading generated tokens agree, over all prompts."""
    same = 0
    for a, b in zip(got, ref, strict=True):
        same += next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(b))
    return f"{same}/{sum(map(len, ref))} leading tokens"


def summarize(results: list[RankResult], run: int, moe_layers: int) -> dict[str, Any]:
    attention, experts = results[0], results[1:]
    steps = attention.step_seconds[run]
    decode_steps = len(steps) - 1
    per_layer = decode_steps * moe_layers
    a = attention.stats[run]
    return {
        "prefill_s": steps[0],
        "decode_s": sum(steps[1:]),
        "decode_steps": decode_steps,
        "decode_tokens": sum(len(t) - 1 for t in attention.token_ids[run]),
        "router_ms": a["seconds"].get("router", 0.0) / per_layer * 1e3,
        "dispatch_ms": a["seconds"].get("dispatch", 0.0) / per_layer * 1e3,
        "combine_ms": a["seconds"].get("combine", 0.0) / per_layer * 1e3,
        "expert_ms": [e.stats[run]["seconds"].get("expert", 0.0) / per_layer * 1e3 for e in experts],
        "expert_idle_ms": [e.stats[run]["seconds"].get("receive", 0.0) / per_layer * 1e3 for e in experts],
        "sent_per_step": a["bytes_sent"] / decode_steps,
        "received_per_step": a["bytes_received"] / decode_steps,
        "max_ranks_per_token": a["max_ranks_per_token"],
        "token_ids": attention.token_ids[run],
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", type=Path, default=CACHE_DIR)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    # the same forkserver (torch already imported) starts the single process and the ranks
    preload = ["torch", "torch.distributed", "moeserve.workers.offline.rank"]
    mp.get_context("forkserver").set_forkserver_preload(preload)
    path = bench_checkpoint(args.model)
    config = ModelConfig.from_file(path)
    prompts = make_prompts(args.batch, args.prompt, config.vocab_size)
    moe_layers = len(config.moe_layers)

    single = run_single(path, prompts, args.new_tokens)
    generation = GenerationSettings(max_tokens=args.new_tokens, stop_at_eos=False)
    runs = [
        Run(([p[:8] for p in prompts[:2]],), GenerationSettings(max_tokens=2)),  # warm-up
        Run((prompts,), generation, ping_pong=False, profile=True),
        Run((prompts,), generation, ping_pong=True, profile=True),
    ]
    settings = EPSettings(1, 2, collective_timeout_s=600, dtype=torch.bfloat16)
    results = launch_local(path, settings, runs)
    plain, pingpong = summarize(results, 1, moe_layers), summarize(results, 2, moe_layers)

    print(
        f"bench model: hidden {config.hidden_size}, {config.num_attention_heads} heads, "
        f"{config.num_hidden_layers} layers ({moe_layers} MoE), {config.n_routed_experts} experts "
        f"top-{config.num_experts_per_tok}, bf16 | batch {args.batch}, prompt {args.prompt}, "
        f"{args.new_tokens} new tokens | torch {torch.__version__}, 1 thread per process, "
        f"{mp.cpu_count()} CPU cores shared by all processes"
    )
    print("\ndecode (prefill excluded)         tok/s  ms/step  vs single  greedy tokens equal to single")
    base = single["decode_tokens"] / single["decode_s"]
    for label, r in (("single process generate()", single), ("(A,E)=(1,2) no split", plain),
                     ("(A,E)=(1,2) ping-pong", pingpong)):  # fmt: skip
        tps = r["decode_tokens"] / r["decode_s"]
        ms = r["decode_s"] / r["decode_steps"] * 1e3
        same = common_prefix(r["token_ids"], single["token_ids"])
        print(f"  {label:<30} {tps:>7.1f} {ms:>8.1f} {tps / base:>9.2f}x  {same}")
    print(
        "  (bf16: expert ranks return per-rank partial sums, so the routed outputs are rounded in a\n"
        "   different order than in one process; near-tied greedy choices can flip. fp32 matches: tests)"
    )

    print("\nper MoE layer per decode step (ms)  router  dispatch  expert compute (rank 0 / 1)  combine wait")
    single_routed = single["routed_s"] / (single["decode_steps"] * moe_layers) * 1e3
    single_router = single["router_s"] / (single["decode_steps"] * moe_layers) * 1e3
    label = "single process"
    print(f"  {label:<32} {single_router:>6.2f} {'-':>9} {single_routed:>14.2f} (all experts) {'-':>9}")
    for label, r in (("no split", plain), ("ping-pong (both micro-batches)", pingpong)):
        e0, e1 = r["expert_ms"]
        print(
            f"  {label:<32} {r['router_ms']:>6.2f} {r['dispatch_ms']:>9.2f} {e0:>11.2f} / {e1:<5.2f}"
            f"         {r['combine_ms']:>7.2f}"
        )
    print(
        "  (dispatch: pack + start the count exchange, dispatch and combine, which never blocks; combine\n"
        "   wait: until the expert ranks' results are back, so it holds their compute when nothing overlaps\n"
        "   it. Ping-pong overlaps the ranks' compute, which pays only if each rank has cores of its own.)"
    )

    print("\nall-to-all bytes per decode step (attention rank)   sent (dispatch)   received (combine)")
    for label, r in (("no split", plain), ("ping-pong", pingpong)):
        print(f"  {label:<50} {r['sent_per_step'] / MB:>10.3f} MB {r['received_per_step'] / MB:>13.3f} MB")
    k, d = config.num_experts_per_tok, config.hidden_size
    print(
        f"  (per token and expert rank visited: dispatch {d * 2} B hidden + {k * 8} B ids/weights, "
        f"combine {d * 2} B; at most {plain['max_ranks_per_token']} ranks per token seen)"
    )

    print("\nmemory per process                 weights (MB)  peak RSS (MB)")
    weights, rss = single["weight_bytes"] / MB, single["peak_rss_bytes"] / MB
    print(f"  {'single process':<32} {weights:>12.1f} {rss:>14.1f}")
    for r in results:
        name = "attention rank 0" if r.role == "attention" else f"expert rank {r.rank - 1}"
        print(f"  {name:<32} {r.weight_bytes / MB:>12.1f} {r.peak_rss_bytes / MB:>14.1f}")
    routed = sum(r.weight_bytes for r in results if r.role == "expert")
    print(
        f"  (routed experts: {routed / MB:.1f} MB in all; each expert rank holds "
        + ", ".join(f"{r.weight_bytes / routed:.0%}" for r in results if r.role == "expert")
        + " of them; RSS includes the interpreter and torch)"
    )


if __name__ == "__main__":
    main()
