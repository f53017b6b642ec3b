"""`moeserve plan --model config.json --gpus N [--trace counts.json]`: a capacity planner, on paper.

For a model config and N GPUs (one rank per GPU) it prints, for several splits into A attention
ranks and E expert ranks: memory per attention rank (weights outside the routed experts + the
latent KV cache of `--seqs` sequences at `--context` tokens), memory per expert rank (its slots of
routed experts, with and without `--redundant` extra slots), the all-to-all bytes per decode step
of one attention rank and of one expert rank (hidden states out and partial sums back, plus ids and
weights, for the expected number of expert ranks a token reaches), and the expected max/mean
expert-rank load for the per-expert load of `--trace` (the contiguous map; EPLB without and with
redundant slots). Nothing runs: weights are counted on the meta device, loads come from the trace.
A trace is what `moeserve_expert_tokens_total{layer,expert}` counts: JSON `{layer: [tokens per
expert]}` (or one list). A trace measured on a model with another expert count is stretched onto
this model's experts (expert i takes the trace's expert i*m/n, by load rank), which is how a small
measured run extrapolates to 64-256 GPUs of a large model.
Legend: n routed experts, K experts per token, D hidden, R redundant slots.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moeserve.workers.cli.args import non_negative_int, positive_int

GiB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}


@dataclass(frozen=True)
class Split:
    """One A/E split of the GPUs and what it costs per rank."""

    attention_ranks: int
    expert_ranks: int
    slots_per_expert_rank: int
    redundant: int
    attention_rank_gib: float
    weights_gib: float
    kv_cache_gib: float
    expert_rank_gib: float
    expert_rank_gib_redundant: float
    a2a_mib_per_attention_rank: float
    a2a_mib_per_expert_rank: float
    ranks_per_token: float
    imbalance_contiguous: float | None
    imbalance_eplb: float | None
    imbalance_eplb_redundant: float | None


def add_parser(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="capacity planner: A/E splits, memory, all-to-all bytes, imbalance")
    plan.add_argument("--model", type=Path, required=True, help="config.json (or its directory)")
    plan.add_argument("--gpus", type=positive_int, required=True, help="GPUs (ranks) per model instance")
    plan.add_argument("--trace", type=Path, default=None, help="per-expert token counts (JSON)")
    plan.add_argument("--context", type=positive_int, default=4096, help="tokens per sequence (KV cache)")
    plan.add_argument("--seqs", type=positive_int, default=64, help="sequences per attention rank")
    plan.add_argument(
        "--redundant", type=non_negative_int, default=None, help="R (default: one per expert rank)"
    )
    plan.add_argument("--gpus-per-node", type=positive_int, default=8, help="for group-limited EPLB")
    plan.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16", help="weights and KV cache")
    plan.add_argument("--json", action="store_true", help="one JSON object per split")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from moeserve.workers.model.config import ConfigError, ModelConfig

    try:
        config = ModelConfig.from_file(args.model)
    except ConfigError as e:
        parser.error(f"--model: {e}")
    if args.gpus < 2:
        parser.error("--gpus: expert parallelism needs at least 2 (one attention and one expert rank)")
    load = None
    if args.trace is not None:
        load = read_trace(parser, args.trace, config.n_routed_experts)
    splits = plan(config, args.gpus, load, args)
    if not splits:
        parser.error(f"--gpus {args.gpus}: no split has between 1 and {config.n_routed_experts} expert ranks")
    if args.json:
        for split in splits:
            print(json.dumps(asdict(split)))
        return 0
    print(describe_model(config, args))
    print(
        " A   E  slots  attn GiB (weights + KV)  expert GiB (R=0 / R)  a2a MiB/step attn / expert  "
        "ranks/token  max/mean contiguous  EPLB  EPLB+R"
    )
    for s in splits:
        imb = [_fmt(x) for x in (s.imbalance_contiguous, s.imbalance_eplb, s.imbalance_eplb_redundant)]
        print(
            f"{s.attention_ranks:>2} {s.expert_ranks:>3} {s.slots_per_expert_rank:>6}  "
            f"{s.attention_rank_gib:>8.2f} ({s.weights_gib:.2f} + {s.kv_cache_gib:.2f})  "
            f"{s.expert_rank_gib:>9.2f} / {s.expert_rank_gib_redundant:.2f} (R={s.redundant})  "
            f"{s.a2a_mib_per_attention_rank:>10.2f} / {s.a2a_mib_per_expert_rank:.2f}  "
            f"{s.ranks_per_token:>11.2f}  {imb[0]:>18}  {imb[1]:>4}  {imb[2]:>6}"
        )
    return 0


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def describe_model(config: Any, args: argparse.Namespace) -> str:
    return (
        f"model: {config.num_hidden_layers} layers ({len(config.moe_layers)} MoE), "
        f"hidden {config.hidden_size}, "
        f"{config.n_routed_experts} routed experts top-{config.num_experts_per_tok}, "
        f"{config.n_shared_experts} shared | {args.gpus} GPUs, {args.dtype}, KV cache {args.seqs} x "
        f"{args.context} tokens per attention rank"
        + (f", trace {args.trace}" if args.trace else ", no trace")
    )


def read_trace(parser: argparse.ArgumentParser, path: Path, num_experts: int) -> list[float]:
    """The trace's per-expert load summed over layers, stretched onto `num_experts` experts."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        parser.error(f"--trace: cannot read {path}: {e}")
    rows = list(raw.values()) if isinstance(raw, dict) else [raw]
    if not rows or not all(
        isinstance(r, list) and r and all(isinstance(v, (int, float)) for v in r) for r in rows
    ):
        parser.error("--trace: expected {layer: [tokens per expert]} or a list of tokens per expert")
    if len({len(r) for r in rows}) != 1 or any(v < 0 for r in rows for v in r):
        parser.error("--trace: every layer needs the same number of non-negative counts")
    summed = [float(sum(col)) for col in zip(*rows, strict=True)]
    return stretch(summed, num_experts)


def stretch(load: list[float], n: int) -> list[float]:
    """`load` over m experts -> n experts with the same shape of distribution (total kept)."""
    m = len(load)
    if m == n:
        return load
    ranked = sorted(load, reverse=True)
    out = [ranked[i * m // n] for i in range(n)]
    scale = sum(load) / sum(out) if sum(out) else 0.0
    return [x * scale for x in out]


def plan(config: Any, gpus: int, load: list[float] | None, args: argparse.Namespace) -> list[Split]:
    from moeserve.workers.parallel.eplb import balanced_placement, imbalance
    from moeserve.workers.parallel.placement import ExpertPlacement

    n, k, d = config.n_routed_experts, config.num_experts_per_tok, config.hidden_size
    width = DTYPE_BYTES[args.dtype]
    dense_bytes = _non_routed_params(config) * width
    expert_bytes = (
        3 * d * config.moe_intermediate_size * width * len(config.moe_layers)
    )  # one expert, all layers
    kv_bytes = config.latent_dim * config.num_hidden_layers * width * args.context * args.seqs
    moe_layers = len(config.moe_layers)
    out: list[Split] = []
    for e in _expert_rank_choices(gpus, n):
        a = gpus - e
        r = e if args.redundant is None else args.redundant
        r = min(r, n * (e - 1))
        reach = _ranks_per_token(n, k, e)
        tokens = args.seqs  # decode: one token per sequence per step
        # per MoE layer: hidden states out + partial sums back (width each), ids int32 + weights fp32 (K each)
        per_token = reach * (2 * d * width + 8 * k)
        a2a_attention = tokens * per_token * moe_layers
        a2a_expert = a2a_attention * a / e
        imb = (None, None, None)
        if load is not None:
            groups = config.n_group if config.topk_method != "greedy" else 1
            nodes = max(1, math.ceil(e / args.gpus_per_node))
            nodes = nodes if e % nodes == 0 else 1
            imb = (
                imbalance(ExpertPlacement.contiguous(n, e), load),
                imbalance(balanced_placement(load, e, 0, groups, nodes), load),
                imbalance(balanced_placement(load, e, r, groups, nodes), load),
            )
        slots = math.ceil((n + r) / e)
        out.append(
            Split(
                a,
                e,
                slots,
                r,
                (dense_bytes + kv_bytes) / GiB,
                dense_bytes / GiB,
                kv_bytes / GiB,
                math.ceil(n / e) * expert_bytes / GiB,
                slots * expert_bytes / GiB,
                a2a_attention / 2**20,
                a2a_expert / 2**20,
                reach,
                *imb,
            )
        )
    return out


def _expert_rank_choices(gpus: int, n: int) -> list[int]:
    """E values worth printing: 1/4, 1/2, 3/4 and all but one of the GPUs, plus powers of two."""
    picks = {max(1, gpus // 4), gpus // 2, 3 * gpus // 4, gpus - 1}
    picks |= {2**i for i in range(int(math.log2(gpus)) + 1)}
    return sorted(e for e in picks if 1 <= e <= min(n, gpus - 1))


def _ranks_per_token(n: int, k: int, e: int) -> float:
    """Expected distinct expert ranks among K uniform distinct choices of n experts on e ranks."""
    per_rank = n / e
    miss = math.comb(int(round(n - per_rank)), k) / math.comb(n, k) if n - per_rank >= k else 0.0
    return e * (1 - miss)


def _non_routed_params(config: Any) -> int:
    """Parameters of an attention rank (everything but the routed experts), counted on the meta device."""
    from moeserve.workers.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(config, with_routed_experts=False)
    return sum(p.numel() for p in model.parameters())
