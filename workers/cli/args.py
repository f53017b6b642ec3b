"""argparse value types shared by every moeserve command: each rejects bad text with a message
that argparse prints next to the argument's name (exit code 2). Parsing only, no behaviour."""

from __future__ import annotations

import argparse

from moeserve.serve_config import FP8_WEIGHTS


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None


def add_fp8_weights_argument(parser: argparse.ArgumentParser) -> None:
    """`--fp8-weights` of `generate` and `serve`."""
    parser.add_argument(
        "--fp8-weights",
        choices=FP8_WEIGHTS,
        default="dequantize",
        help="an FP8 checkpoint's weights: dequantized to --dtype at load (default, faster on the CPU) "
        "or kept fp8 and dequantized per block inside each matmul (half the memory); every rank alike",
    )


def non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(_number(text, float))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(_number(text, float))
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def token_ids(text: str) -> list[int]:
    """Comma-separated non-negative token ids, e.g. `1,2,3`."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"expected non-negative token ids, got {text!r}")
    return ids
