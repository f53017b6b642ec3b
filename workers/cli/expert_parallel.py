"""`moeserve generate --attention-ranks A --expert-ranks E`: the expert-parallel flags of the CLI.

Also the redundant-expert and rebalancing flags that `moeserve serve --expert-ranks` shares.

Adds the flags to the generate subparser, rejects invalid combinations with `parser.error`
(exit code 2) before any process starts, spreads prompts over the attention ranks round robin,
runs one local world and returns the generated ids in prompt order. A failed rank is printed with
the launcher's message and ends the command with exit code 1. Printing results is `cli.py`'s job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeserve.workers.cli.args import non_negative_float, non_negative_int, positive_float, positive_int

if TYPE_CHECKING:
    from moeserve.workers.parallel.settings import EPSettings


def add_arguments(gen: argparse.ArgumentParser) -> None:
    ep = gen.add_argument_group("expert parallelism (local processes, gloo)")
    ep.add_argument("--attention-ranks", type=positive_int, default=1, help="A; prompts go round robin")
    ep.add_argument("--expert-ranks", type=non_negative_int, default=0, help="E; 0 = single process")
    ep.add_argument("--ping-pong", action="store_true", help="decode in two interleaved micro-batches")
    ep.add_argument(
        "--collective-timeout", type=positive_float, default=60.0, help="seconds before a stuck rank fails"
    )
    ep.add_argument("--expert-map", default=None, help="experts per expert rank, e.g. '0-7;8-15'")
    add_balance_arguments(ep)


def add_balance_arguments(group: argparse._ActionsContainer) -> None:
    """Redundant experts and online rebalancing (generate and serve with --expert-ranks)."""
    group.add_argument(
        "--redundant-experts",
        type=non_negative_int,
        default=0,
        help="R extra expert slots over the expert ranks",
    )
    group.add_argument(
        "--rebalance-interval",
        type=non_negative_int,
        default=0,
        help="steps between EPLB rebalances from the counted load (0 = only on request: serve's "
        "POST /admin/experts/rebalance)",
    )
    group.add_argument(
        "--rebalance-min-gain",
        type=non_negative_float,
        default=0.05,
        help="least relative drop of max/mean rank load for a new map (default 0.05)",
    )


def check_placement(parser: argparse.ArgumentParser, settings: EPSettings, model: Path) -> None:
    """Exit 2 naming the flags if the settings give no valid expert map for the model."""
    from moeserve.workers.model.config import ConfigError, ModelConfig
    from moeserve.workers.parallel.placement import PlacementError

    try:
        settings.expert_placement(ModelConfig.from_file(model))
    except ConfigError as err:
        parser.error(f"--model: {err}")
    except PlacementError as err:
        parser.error(f"--expert-ranks/--redundant-experts: {err}")


def balance_settings(args: argparse.Namespace) -> dict[str, int | float]:
    """The `EPSettings` fields of `add_balance_arguments`."""
    return {
        "redundant_experts": args.redundant_experts,
        "rebalance_interval": args.rebalance_interval,
        "rebalance_min_gain": args.rebalance_min_gain,
    }


def requested(args: argparse.Namespace) -> bool:
    return bool(
        args.expert_ranks
        or args.attention_ranks > 1
        or args.ping_pong
        or args.expert_map
        or args.redundant_experts
        or args.rebalance_interval
    )


def generate(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    path: Path,
    prompts: list[list[int]],
    dtype: torch.dtype,
) -> list[list[int]]:
    """Generated ids per prompt from A attention ranks + E expert ranks (local processes)."""
    from moeserve.workers.model.config import ConfigError, ModelConfig
    from moeserve.workers.offline.generate import GenerationSettings
    from moeserve.workers.offline.local_world import RankFailure, launch_local
    from moeserve.workers.offline.rank import Run
    from moeserve.workers.parallel.placement import PlacementError, parse_map
    from moeserve.workers.parallel.settings import EPSettings

    a, e = args.attention_ranks, args.expert_ranks
    if e == 0:
        parser.error(
            "--attention-ranks > 1, --ping-pong, --expert-map, --redundant-experts and --rebalance-interval "
            "need --expert-ranks >= 1"
        )
    try:
        config = ModelConfig.from_file(path)
        explicit = tuple(tuple(r) for r in parse_map(args.expert_map)) if args.expert_map else None
        settings = EPSettings(
            a,
            e,
            args.collective_timeout,
            dtype=dtype,
            placement=explicit,
            fp8_weights=args.fp8_weights,
            **balance_settings(args),
        )
        placement = settings.expert_placement(config)  # a bad map is rejected here, before any process starts
    except ConfigError as err:
        parser.error(f"--model: {err}")
    except PlacementError as err:
        parser.error(f"--expert-ranks/--expert-map/--redundant-experts: {err}")
    if args.redundant_experts or args.rebalance_interval:
        print(f"moeserve generate: expert map {placement.describe()}", file=sys.stderr)
    if any(t >= config.vocab_size for p in prompts for t in p):
        parser.error(f"--prompt-ids: token id out of range (vocab size {config.vocab_size})")
    generation = GenerationSettings(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    per_rank = tuple(prompts[r::a] for r in range(a))  # round robin
    try:
        results = launch_local(path, settings, [Run(per_rank, generation, ping_pong=args.ping_pong)])
    except RankFailure as err:
        print(f"moeserve generate: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    return [results[i % a].token_ids[0][i // a] for i in range(len(prompts))]
