"""`--dtype` of `generate` and `serve`: resolve "auto" for this host and say what was chosen.

The choice goes to stderr as one line at start (stdout stays the command's output, e.g. `--json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def resolve_dtype_or_exit(
    parser: argparse.ArgumentParser, requested: str, path: Path, device: torch.device
) -> torch.dtype:
    """The compute dtype for `--dtype requested`; a checkpoint whose dtype cannot be read exits 2."""
    from moeserve.workers.model.dtype_policy import resolve_dtype

    try:
        choice = resolve_dtype(requested, path, device)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        parser.error(f"--dtype {requested}: cannot read the checkpoint's dtype in {path}: {e}")
    print(f"moeserve: {choice.describe()}", file=sys.stderr, flush=True)
    return choice.compute
