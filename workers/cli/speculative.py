"""The speculative-decoding flags of `moeserve generate` and `moeserve serve`: `--speculative mtp`
and `--num-speculative-tokens K`. Argument definitions and their checks only (usage errors exit 2
naming the flag); the engine does the work (`engine/speculative.py`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeserve.workers.cli.args import positive_int

MAX_TOKENS = 3  # the engine's MAX_SPECULATIVE_TOKENS, without importing torch here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speculative",
        choices=["mtp"],
        default=None,
        help="speculative decoding: mtp drafts with the checkpoint's multi-token-prediction layer "
        "(same output: greedy identical, sampling exact)",
    )
    parser.add_argument(
        "--num-speculative-tokens",
        type=positive_int,
        default=None,
        help=f"draft tokens per step with --speculative (1 to {MAX_TOKENS}, default 1)",
    )


def check(parser: argparse.ArgumentParser, args: argparse.Namespace, model_path: Path) -> int:
    """Exit 2 on a bad combination; the number of draft tokens (1 without --speculative)."""
    k = args.num_speculative_tokens
    if args.speculative is None:
        if k is not None:
            parser.error("--num-speculative-tokens needs --speculative mtp")
        return 1
    k = 1 if k is None else k
    if not 1 <= k <= MAX_TOKENS:
        parser.error(f"--num-speculative-tokens: must be in [1, {MAX_TOKENS}], got {k}")
    if args.command == "generate" and args.expert_ranks:  # offline EP decoding has no engine to draft in
        parser.error(
            "--speculative: `generate` drafts in one process; with expert ranks use "
            "`moeserve serve --expert-ranks N --speculative mtp`"
        )
    from moeserve.workers.model.config import ConfigError, ModelConfig

    try:
        config = ModelConfig.from_file(model_path)
    except ConfigError as e:
        parser.error(f"--model: {e}")
    if config.num_nextn_predict_layers < 1:
        parser.error(
            f"--speculative mtp: the checkpoint {model_path} has no MTP layer "
            "(config.json num_nextn_predict_layers is 0 or absent)"
        )
    return k
