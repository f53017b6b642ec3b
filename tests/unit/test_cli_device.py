"""`moeserve generate --device / --enforce-eager`: a device that cannot run exits 2 naming the flag;
--enforce-eager is accepted (on the CPU there are no graphs to turn off, the tokens are the same)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def generate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moeserve.workers.cli.main", "generate", "--prompt-ids", "1,2,3",
         "--max-tokens", "4", "--json", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("device", ["tpu", "cuda:99", "meta"])
def test_a_device_that_cannot_run_exits_2(device: str, reference_checkpoints) -> None:
    res = generate_cli("--model", str(reference_checkpoints["v2_lite"]), "--device", device)
    assert res.returncode == 2, res.stderr
    assert "--device" in res.stderr


def test_enforce_eager_gives_the_same_tokens(reference_checkpoints) -> None:
    path = str(reference_checkpoints["v2_lite"])
    runs = [generate_cli("--model", path, *extra) for extra in ([], ["--enforce-eager"])]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    tokens = [json.loads(r.stdout)["token_ids"] for r in runs]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 4
