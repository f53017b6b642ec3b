"""Expert load balancing benchmark: a skewed router, (A, E) = (1, 2), before and after EPLB, one run.

Model: the `bench` preset's shape (hidden 2048, 4 layers with the first dense, 16 routed experts
top-6 + 2 shared, vocab 8192; bf16 weights, run in `--dtype`) with a DeepSeek-V3 router
(`noaux_tc`, sigmoid, one group) whose `e_score_correction_bias` (selection only, not the weights)
makes a few experts hot: experts HOT (default 0-3, all on expert rank 0 of the contiguous map) are
picked by nearly every token. Written once under ~/.cache/moeserve/bench-model-eplb.
One local world (1 attention rank + 2 expert ranks, gloo, one thread per process) runs, on the same
prompts: a warm-up; "before": decode on the starting map (contiguous + R redundant slots cycled);
"after": the same generation, the rebalance (EPLB over the tokens counted so far, weights copied
rank to rank) requested before its first step. Printed per phase: decode tokens/s, each expert
rank's compute per MoE layer per decode step, their max/mean (the slowest expert rank sets every
step's time), the predicted rank-load imbalance of the map, and whether greedy tokens agree
(bf16: per-rank partial sums round in another order, so near ties may flip; in fp32 they agree).
Balance shows in expert time once each expert gets many rows (large batches, prefill); at small
batches an expert rank's time is reading the weights of every expert that got any token.
CPU timings; on a shared machine they are noisy: run it alone and state `uptime`.

    python bench/bench_eplb.py [--batch 128] [--prompt 16] [--new-tokens 8] [--redundant 2]
                               [--hot 0,1,2,3] [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.random_checkpoint import PRESETS, write_random_checkpoint
from moeserve.workers.offline.generate import GenerationSettings
from moeserve.workers.offline.local_world import launch_local
from moeserve.workers.offline.rank import RankResult, Run
from moeserve.workers.parallel.settings import EPSettings

CACHE_DIR = Path.home() / ".cache" / "moeserve" / "bench-model-eplb"
BIAS = 4.0  # added to the sigmoid scores of the hot experts: above any other expert's score


def biased_checkpoint(path: Path, hot: list[int]) -> Path:
    """The bench shape with a V3 router whose correction bias favours `hot` (rewritten if they change)."""
    marker = path / "hot.json"
    if marker.exists() and json.loads(marker.read_text()) == hot:
        return path
    preset = {**PRESETS["bench"], "model_type": "deepseek_v3", "topk_method": "noaux_tc"}
    preset.update(scoring_func="sigmoid", n_group=1, topk_group=1, norm_topk_prob=True)
    write_random_checkpoint(path, preset, torch.bfloat16, seed=0)
    weights = load_file(path / "model.safetensors")
    for name in [n for n in weights if n.endswith("e_score_correction_bias")]:
        bias = torch.zeros_like(weights[name])
        bias[hot] = BIAS
        weights[name] = bias
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    marker.write_text(json.dumps(hot))
    return path


def phase(results: list[RankResult], run: int, moe_layers: int) -> dict[str, Any]:
    attention, experts = results[0], results[1:]
    steps = attention.step_seconds[run][1:]  # decode steps (step 0 is the prefill)
    per_layer = len(steps) * moe_layers
    expert_ms = [e.stats[run]["seconds"].get("expert", 0.0) / per_layer * 1e3 for e in experts]
    imbalance = attention.stats[run]["imbalance"]
    return {
        "tok_s": sum(len(t) - 1 for t in attention.token_ids[run]) / sum(steps),
        "ms_step": sum(steps) / len(steps) * 1e3,
        "expert_ms": expert_ms,
        "max_mean": max(expert_ms) / (sum(expert_ms) / len(expert_ms)),
        "rebalances": attention.stats[run]["rebalances"],
        "rebalance_s": attention.stats[run]["rebalance_s"],
        "imbalance": _mean(imbalance),
        "maps": experts[0].stats[run]["expert_ids"],
        "maps_1": experts[1].stats[run]["expert_ids"],
        "token_ids": attention.token_ids[run],
    }


def _mean(by_layer: dict[int, float]) -> float:
    return sum(by_layer.values()) / len(by_layer) if by_layer else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=CACHE_DIR)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--redundant", type=int, default=2, help="R redundant expert slots")
    parser.add_argument("--hot", default="0,1,2,3", help="experts the router is biased to")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    hot = [int(e) for e in args.hot.split(",")]
    mp.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch.distributed", "moeserve.workers.offline.rank"]
    )
    path = biased_checkpoint(args.model, hot)
    config = ModelConfig.from_file(path)
    moe_layers = len(config.moe_layers)
    prompts = torch.randint(
        2, config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)
    )
    generation = GenerationSettings(max_tokens=args.new_tokens, stop_at_eos=False)
    runs = [
        Run(([p[:8] for p in prompts.tolist()[:2]],), GenerationSettings(max_tokens=2)),  # warm-up
        Run((prompts.tolist(),), generation, profile=True),  # before: the starting map
        Run((prompts.tolist(),), generation, profile=True, rebalance=True),  # after: EPLB first
    ]
    settings = EPSettings(
        1,
        2,
        collective_timeout_s=600,
        dtype=getattr(torch, args.dtype),
        redundant_experts=args.redundant,
        rebalance_min_gain=0.0,
    )
    start = settings.expert_placement(config)
    results = launch_local(path, settings, runs)
    before, after = phase(results, 1, moe_layers), phase(results, 2, moe_layers)
    before["imbalance"] = _mean(results[0].stats[2]["imbalance_before"])  # the starting map, same window

    print(
        f"bench model (biased V3 router, hot experts {hot}): hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers ({moe_layers} MoE), {config.n_routed_experts} experts "
        f"top-{config.num_experts_per_tok}, {args.dtype} | batch {args.batch}, prompt {args.prompt}, "
        f"{args.new_tokens} new tokens | (A,E)=(1,2), R={args.redundant} | torch {torch.__version__}, "
        f"1 thread per process, {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}"
    )
    print(f"starting map: {start.describe()}")
    layer = min(after["maps"])
    print(f"after EPLB (MoE layer {layer}): rank 0 {after['maps'][layer]}; rank 1 {after['maps_1'][layer]}")
    print(
        f"rebalance: {after['rebalances']} (before the first step of 'after', "
        f"{after['rebalance_s'] * 1e3:.0f} ms on the attention rank, weights copied rank to rank)"
    )
    print(
        "\nphase    decode tok/s  ms/step  expert ms/layer/step (rank 0 / 1)  max/mean  predicted imbalance"
    )
    for label, r in (("before", before), ("after", after)):
        ms = " / ".join(f"{x:.2f}" for x in r["expert_ms"])
        print(
            f"{label:<8} {r['tok_s']:>12.1f} {r['ms_step']:>8.1f}  {ms:>33}  {r['max_mean']:>8.2f}  "
            f"{r['imbalance']:.2f}"
        )
    print(
        f"\nafter / before: tokens/s {after['tok_s'] / before['tok_s']:.2f}x, slowest expert rank "
        f"{max(after['expert_ms']) / max(before['expert_ms']):.2f}x the time"
    )
    same = sum(a == b for a, b in zip(after["token_ids"], before["token_ids"], strict=True))
    print(f"greedy outputs equal before/after the rebalance for {same}/{len(prompts)} prompts ({args.dtype})")


if __name__ == "__main__":
    main()
