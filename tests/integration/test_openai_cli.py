"""`moeserve serve` starts the OpenAI HTTP API beside gRPC in the same process: `--http-port 0`
prints the port it got, and on the expert-parallel backend (`--expert-ranks`) the HTTP API gives
the same tokens as the gRPC API of the same process; bad HTTP flags exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from moeserve.workers.client import InferenceClient, build_request

pytestmark = pytest.mark.integration


def test_serve_with_expert_ranks_serves_http_beside_grpc(serving_checkpoint: Path) -> None:
    cmd = [sys.executable, "-m", "moeserve.workers.cli.main", "serve", "--model", str(serving_checkpoint)]
    cmd += [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-metrics",
        "--http-port",
        "0",
        "--max-model-len",
        "256",
    ]
    cmd += ["--expert-ranks", "1", "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+), OpenAI HTTP API on :(\d+)", line)
        assert match, line
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        with InferenceClient(f"127.0.0.1:{match.group(1)}") as grpc_client:
            grpc_client.wait_serving(timeout=120)
            ref = grpc_client.generate(build_request("hello", max_tokens=8, temperature=0.0, ignore_eos=True))
        base = f"http://127.0.0.1:{match.group(2)}/v1"
        with openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=60) as api:
            assert [m.id for m in api.models.list().data] == ["tiny"]
            out = api.completions.create(
                model="tiny", prompt="hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
            )
            assert out.choices[0].text == ref.text
            assert out.usage is not None and out.usage.completion_tokens == ref.completion_tokens == 8
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--http-port", "70000"], "--http-port: must be in [0, 65535]"),
    ],
)
def test_bad_http_flags_exit_2(serving_checkpoint: Path, flags: list[str], message: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "moeserve.workers.cli.main",
        "serve",
        "--model",
        str(serving_checkpoint),
        *flags,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_a_template_that_does_not_compile_exits_2(serving_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    cmd = [sys.executable, "-m", "moeserve.workers.cli.main", "serve", "--model", str(serving_checkpoint)]
    res = subprocess.run([*cmd, "--chat-template", str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--chat-template: chat template does not compile" in res.stderr, res.stderr
