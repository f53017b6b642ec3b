"""`moeserve experts plot --metrics URL --out load.png`: expert and expert-rank load as a picture.

Reads a server's Prometheus text (`URL`: http(s)://.../metrics, or file://) for
`moeserve_expert_tokens_total{layer, expert}` (or Ray's `ray_moeserve_*`, summed over instances and
ranks) and the current map `moeserve_expert_map{layer, expert_rank, expert}`, and draws two panels:
tokens per routed expert (summed over MoE layers; replicated experts hatched), and tokens per expert
rank under the contiguous map ("before") and under the server's current map, or, for a server
without one, the EPLB map `--expert-ranks`/`--redundant` would give ("after"); each expert's tokens
split evenly over its replicas. Needs matplotlib (`pip install "moeserve[plot]"`).
"""

from __future__ import annotations

import argparse
import urllib.request
from collections import defaultdict
from pathlib import Path

from moeserve import extras
from moeserve.workers.cli.args import non_negative_int, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    experts = sub.add_parser("experts", help="expert load tools")
    experts_sub = experts.add_subparsers(dest="experts_command", required=True)
    plot = experts_sub.add_parser("plot", help="plot per-expert and per-expert-rank load from /metrics")
    plot.add_argument("--metrics", required=True, help="a /metrics URL (http://HOST:PORT/metrics or file://)")
    plot.add_argument("--out", type=Path, required=True, help="PNG file to write")
    plot.add_argument(
        "--expert-ranks", type=positive_int, default=None, help="E, when the metrics carry no expert map"
    )
    plot.add_argument("--redundant", type=non_negative_int, default=0, help="R for that computed map")


class MetricsError(ValueError):
    """The metrics hold no expert load to plot; the message says what is missing."""


def read_metrics(text: str) -> tuple[dict[int, list[float]], dict[int, list[list[int]]]]:
    """Prometheus text -> (layer -> tokens per expert, layer -> experts per expert rank)."""
    from prometheus_client.parser import text_string_to_metric_families

    tokens: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    hosted: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name.endswith("moeserve_expert_tokens_total") or name.endswith("moeserve_expert_tokens"):
                tokens[int(labels["layer"])][int(labels["expert"])] += sample.value
            elif name.endswith("moeserve_expert_map") and sample.value:
                hosted[int(labels["layer"])][int(labels["expert_rank"])].append(int(labels["expert"]))
    if not tokens:
        raise MetricsError("no moeserve_expert_tokens_total samples: is this a moeserve /metrics endpoint?")
    n = 1 + max(e for per in tokens.values() for e in per)
    load = {layer: [per.get(e, 0.0) for e in range(n)] for layer, per in sorted(tokens.items())}
    maps = {
        layer: [sorted(per[r]) for r in range(1 + max(per))] for layer, per in sorted(hosted.items()) if per
    }
    return load, maps


def rank_load(load: dict[int, list[float]], maps: dict[int, list[list[int]]]) -> list[float]:
    """Tokens per expert rank over every layer, each expert's tokens split over its replicas."""
    from moeserve.workers.parallel.eplb import rank_loads
    from moeserve.workers.parallel.placement import ExpertPlacement

    total: list[float] = []
    for layer, counts in load.items():
        ranks = maps[layer]
        slots = sum(len(ids) for ids in ranks)
        placement = ExpertPlacement.from_lists(len(counts), ranks, slots - len(counts))
        per = rank_loads(placement, counts)
        total = [a + b for a, b in zip(total, per, strict=True)] if total else per
    return total


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    extras.require_or_exit(extras.PLOT, "moeserve experts plot", "moeserve")
    from moeserve.workers.parallel.eplb import balanced_placement
    from moeserve.workers.parallel.placement import ExpertPlacement, PlacementError

    try:
        with urllib.request.urlopen(args.metrics, timeout=10) as response:
            text = response.read().decode()
    except (OSError, ValueError) as e:
        parser.error(f"--metrics: cannot read {args.metrics}: {e}")
    try:
        load, maps = read_metrics(text)
    except (MetricsError, ValueError) as e:
        parser.error(f"--metrics: {e}")
    n = len(next(iter(load.values())))
    ranks = args.expert_ranks or (len(next(iter(maps.values()))) if maps else None)
    if ranks is None:
        parser.error("--expert-ranks: the metrics carry no expert map (a single-process server): give E")
    try:
        before = {layer: [list(ids) for ids in ExpertPlacement.contiguous(n, ranks).ranks] for layer in load}
        if maps and len(next(iter(maps.values()))) == ranks and set(maps) == set(load):
            after, label = maps, "current map"
        else:
            balanced = {layer: balanced_placement(c, ranks, args.redundant) for layer, c in load.items()}
            after = {layer: [list(ids) for ids in p.ranks] for layer, p in balanced.items()}
            label = f"EPLB map (R={args.redundant})"
        plot(load, rank_load(load, before), rank_load(load, after), after, label, args.out)
    except PlacementError as e:
        parser.error(f"--expert-ranks/--redundant: {e}")
    print(args.out)
    return 0


def plot(
    load: dict[int, list[float]],
    before: list[float],
    after: list[float],
    after_map: dict[int, list[list[int]]],
    after_label: str,
    out: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    per_expert = [sum(col) for col in zip(*load.values(), strict=True)]
    replicated = {
        e for ranks in after_map.values() for e in range(len(per_expert)) if sum(e in r for r in ranks) > 1
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    bars = left.bar(range(len(per_expert)), per_expert, color="tab:blue")
    for e, bar in enumerate(bars):
        if e in replicated:
            bar.set_hatch("//")
    left.set(
        title="tokens per routed expert (all MoE layers; hatched: replicated)",
        xlabel="expert",
        ylabel="tokens",
    )
    width = 0.4
    xs = range(len(before))
    mean = sum(before) / len(before)
    right.bar(
        [x - width / 2 for x in xs], before, width, label=f"contiguous: max/mean {max(before) / mean:.2f}"
    )
    right.bar(
        [x + width / 2 for x in xs], after, width, label=f"{after_label}: max/mean {max(after) / mean:.2f}"
    )
    right.axhline(mean, color="gray", linestyle="--", linewidth=1, label="ideal (mean)")
    right.set(title="tokens per expert rank", xlabel="expert rank", ylabel="tokens", xticks=list(xs))
    right.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
