"""Optional extras: a clear one-line error when a feature's package is not installed.

`moeserve serve --ray` needs `moeserve[ray]`, `moeserve-operator` needs `moeserve[operator]` and
`moeserve experts plot` needs `moeserve[plot]`. Without
them the user gets one line naming the missing package and the pip command, and exit code 2 (a usage
error), never an import traceback. This module imports nothing optional itself.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

EXIT_USAGE = 2


@dataclass(frozen=True)
class Extra:
    """One optional dependency group of the `moeserve` distribution."""

    name: str
    """The extra's name in pyproject.toml, as in `pip install "moeserve[NAME]"`."""
    modules: tuple[str, ...]
    """Top-level modules that must import for the feature to run."""


RAY = Extra("ray", ("ray", "ray.serve"))
OPERATOR = Extra("operator", ("kopf", "kubernetes", "urllib3"))
PLOT = Extra("plot", ("matplotlib",))


class MissingExtraError(RuntimeError):
    """A module of an optional extra does not import."""


def missing_module(extra: Extra) -> str | None:
    """The first module of `extra` that is not installed, or None when all import."""
    for module in extra.modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            # Only a missing module of the extra itself counts; anything else is a real bug to show.
            missing = err.name or module
            if missing == module or module.startswith(missing + "."):
                return missing
            raise
    return None


def require(extra: Extra, feature: str) -> None:
    """Raise MissingExtraError naming the package and the pip command if `extra` is not installed."""
    missing = missing_module(extra)
    if missing is not None:
        raise MissingExtraError(
            f"{feature} needs the Python package '{missing}', which is not installed: "
            f'pip install "moeserve[{extra.name}]"'
        )


def require_or_exit(extra: Extra, feature: str, prog: str) -> None:
    """`require`, for a command line: print the one-line error to stderr and exit with code 2."""
    try:
        require(extra, feature)
    except MissingExtraError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
