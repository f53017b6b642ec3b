"""`moeserve serve` as a real process: streams to `moeserve generate --endpoint`, maps errors to exit
codes, and stops gracefully on SIGTERM (in-flight streams finish)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeserve.workers.client import Completion, InferenceClient, build_request, gather
from moeserve.workers.model.loader import load_model
from moeserve.workers.offline.generate import GenerationSettings, generate

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moeserve.workers.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def served(serving_checkpoint: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeserve.workers.cli.main", "serve", "--model", str(serving_checkpoint)]
        + [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--max-model-len",
            "256",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (\S+):(\d+), metrics on :(\d+)", line)
    assert match, line
    address = f"127.0.0.1:{match.group(2)}"
    with InferenceClient(address) as client:
        client.wait_serving(timeout=120)
    yield proc, address
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_generate_from_an_endpoint_matches_offline_generation(
    served: tuple[subprocess.Popen[str], str], serving_checkpoint: Path
) -> None:
    _, address = served
    res = cli(
        "generate",
        "--endpoint",
        address,
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
    offline = generate(load_model(serving_checkpoint), [[1, 2, 3], [7, 8]], GenerationSettings(max_tokens=6))
    assert [line["token_ids"] for line in lines] == offline
    assert all(line["usage"]["completion_tokens"] == len(line["token_ids"]) for line in lines)


def test_text_prompt_streams_text(served: tuple[subprocess.Popen[str], str]) -> None:
    res = cli("generate", "--endpoint", served[1], "--prompt", "日本語の", "--max-tokens", "5")
    assert res.returncode == 0, res.stderr
    assert res.stdout.endswith("\n") and len(res.stdout) > 1


def test_rpc_errors_exit_1_with_the_status(served: tuple[subprocess.Popen[str], str]) -> None:
    res = cli("generate", "--endpoint", served[1], "--prompt-ids", "1", "--top-p", "1.5")
    assert res.returncode == 1 and "INVALID_ARGUMENT: sampling.top_p" in res.stderr


def test_bad_arguments_exit_2(served: tuple[subprocess.Popen[str], str], tmp_path: Path) -> None:
    both = cli("generate", "--endpoint", served[1], "--model", str(tmp_path), "--prompt-ids", "1")
    assert both.returncode == 2 and "--endpoint" in both.stderr
    offline_only = cli("generate", "--model", str(tmp_path), "--prompt-ids", "1", "--top-k", "3")
    assert offline_only.returncode == 2 and "--top-k needs --endpoint" in offline_only.stderr
    missing = cli("serve", "--model", str(tmp_path / "none"))
    assert missing.returncode == 2 and "--model" in missing.stderr


def test_sigterm_lets_the_running_stream_finish_then_exits_0(
    served: tuple[subprocess.Popen[str], str],
) -> None:
    proc, address = served
    with InferenceClient(address) as client:
        stream = client.stream(build_request(prompt_token_ids=[2, 3], max_tokens=150, ignore_eos=True))
        first = next(stream)
        result: list[Completion] = []
        reader = threading.Thread(target=lambda: result.append(gather(stream)))
        reader.start()
        proc.send_signal(signal.SIGTERM)
        reader.join(30)
    assert proc.wait(30) == 0
    assert result and result[0].finish_reason == "length"
    assert len(first.token_ids) + len(result[0].token_ids) == 150
