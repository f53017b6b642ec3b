"""`moeserve generate --speculative mtp`: the same greedy tokens as without, and usage errors (exit 2
naming the flag) for bad combinations. The embedded default model carries a trained MTP layer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PROMPT = "import os\nimport sys\n\n\ndef main():\n    "


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moeserve.workers.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_generate_with_mtp_gives_the_same_tokens() -> None:
    # fp32: verifying K drafts in one step is exact only where rounding does not depend on the step's shape.
    greedy = ("generate", "--prompt", PROMPT, "--max-tokens", "24", "--json", "--dtype", "float32")
    plain = run_cli(*greedy)
    spec = run_cli(*greedy, "--speculative", "mtp", "--num-speculative-tokens", "2")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert json.loads(spec.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
    assert "drafts accepted" in spec.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--speculative", "mtp", "--num-speculative-tokens", "4"),
            "--num-speculative-tokens: must be in [1, 3]",
        ),
        (("--num-speculative-tokens", "2"), "--num-speculative-tokens needs --speculative mtp"),
        (("--speculative", "eagle"), "--speculative: invalid choice"),
        (
            ("--speculative", "mtp", "--expert-ranks", "1"),
            "with expert ranks use `moeserve serve --expert-ranks N",
        ),
    ],
)
def test_bad_speculative_arguments_exit_2(args: tuple[str, ...], message: str) -> None:
    res = run_cli("generate", "--prompt-ids", "1,2,3", *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_a_checkpoint_without_an_mtp_layer_exits_2(reference_checkpoints, tmp_path: Path) -> None:
    res = run_cli(
        "generate",
        "--model",
        str(reference_checkpoints["v2_lite"]),
        "--prompt-ids",
        "1,2",
        "--speculative",
        "mtp",
    )
    assert (
        res.returncode == 2
        and "--speculative mtp: the checkpoint" in res.stderr
        and "no MTP layer" in res.stderr
    )
