"""`moeserve` CLI: offline generation output and exit code 2 on bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeserve.workers.model.loader import load_model
from moeserve.workers.offline.generate import GenerationSettings, generate

pytestmark = pytest.mark.unit


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moeserve.workers.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_json_matches_library(reference_checkpoints) -> None:
    path = reference_checkpoints["v2_lite"]
    res = run_cli(
        "generate",
        "--model",
        str(path),
        "--prompt-ids",
        "1,2,3",
        "--prompt-ids",
        "7,8",
        "--max-tokens",
        "6",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    expected = generate(load_model(path), [[1, 2, 3], [7, 8]], GenerationSettings(max_tokens=6))
    assert [line["token_ids"] for line in lines] == expected


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-ids", "1,x"], "--prompt-ids"),
        (["--prompt-ids", "1", "--max-tokens", "0"], "--max-tokens"),
        (["--prompt-ids", "1", "--temperature", "-1"], "--temperature"),
        ([], "exactly one of --prompt or --prompt-ids"),
        (["--prompt-ids", "999999"], "out of range"),
        (["--prompt", "hello"], "tokenizer.json"),
    ],
)
def test_bad_arguments_exit_2_with_message(reference_checkpoints, args: list[str], message: str) -> None:
    res = run_cli("generate", "--model", str(reference_checkpoints["v2_lite"]), *args)
    assert res.returncode == 2
    assert message in res.stderr


def test_missing_model_dir_exits_2(tmp_path: Path) -> None:
    res = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1")
    assert res.returncode == 2 and "--model" in res.stderr


def test_init_random_then_generate(tmp_path: Path) -> None:
    assert run_cli("model", "init-random", "--preset", "tiny", "--out", str(tmp_path / "m")).returncode == 0
    res = run_cli(
        "generate", "--model", str(tmp_path / "m"), "--prompt-ids", "5,6", "--max-tokens", "4", "--json"
    )
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["token_ids"]) == 4
    assert run_cli("model", "init-random", "--preset", "huge", "--out", str(tmp_path / "x")).returncode == 2


def test_import_operator_is_still_the_standard_library() -> None:
    repo = Path(__file__).resolve().parents[2]
    for cwd in (repo, repo / "tests"):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import operator, moeserve.operator; print(operator.__file__, operator.itemgetter)",
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "site-packages" not in out.split()[0] and out.split()[0].endswith("operator.py")
        assert str(repo / "operator") not in out.split()[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tls-cert", "server.crt"], "--tls-cert and --tls-key go together"),
        (["--max-stop-strings", "-1"], "--max-stop-strings: must be >= 0, got -1"),
    ],
)
def test_bad_serve_limits_and_tls_flags_exit_2(reference_checkpoints, args: list[str], message: str) -> None:
    res = run_cli("serve", "--model", str(reference_checkpoints["v2_lite"]), "--port", "0", *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr
