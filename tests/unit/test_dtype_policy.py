"""`--dtype auto` (the default of `generate` and `serve`): the policy, reading a checkpoint's dtype,
and the commands printing and using the choice. `ATEN_CPU_CAPABILITY=avx2` makes torch dispatch as an
AVX2-only host does, so an AVX-512 host runs both choices; an AVX2-only host sees fp32 compute
both times."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moeserve.workers.kernels import widen_gemm
from moeserve.workers.kernels.cpu_capability import CpuCapability, cpu_capability
from moeserve.workers.model.dtype_policy import (
    checkpoint_dtype,
    choose_dtype,
    matmul_weight_dtype,
    resolve_dtype,
)
from moeserve.workers.model.random_checkpoint import PRESETS, write_random_checkpoint

pytestmark = pytest.mark.unit

AVX2 = CpuCapability(dispatch="AVX2", native_bf16=False, native_fp16=False, hardware=())
AVX512_BF16 = CpuCapability(dispatch="AVX512", native_bf16=True, native_fp16=False, hardware=("avx512_bf16",))
CPU = torch.device("cpu")
DTYPE_LINE = re.compile(r"moeserve: dtype: checkpoint (\w+) -> compute (\w+), weights (\w+)")


def test_fp32_checkpoints_stay_fp32_everywhere() -> None:
    for cap in (AVX2, AVX512_BF16):
        choice = choose_dtype(torch.float32, CPU, cap)
        assert (choice.compute, choice.weights) == (torch.float32, torch.float32)
    assert choose_dtype(torch.float32, torch.device("cuda"), AVX2).compute == torch.float32


def test_bf16_computes_in_fp32_without_native_bf16_and_in_bf16_with_it() -> None:
    assert widen_gemm.available(), widen_gemm.why_unavailable()  # test_widen_gemm.py says why
    slow = choose_dtype(torch.bfloat16, CPU, AVX2)
    assert (slow.checkpoint, slow.compute, slow.weights) == (torch.bfloat16, torch.float32, torch.bfloat16)
    assert "widened to fp32 in registers" in slow.describe() and "AVX2" in slow.describe()
    assert "converted" not in slow.describe()
    fast = choose_dtype(torch.bfloat16, CPU, AVX512_BF16)
    assert (fast.compute, fast.weights) == (torch.bfloat16, torch.bfloat16)
    assert "converted" not in fast.describe()


def test_without_the_kernel_avx2_converts_the_weights_to_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(widen_gemm, "available", lambda: False)
    slow = choose_dtype(torch.bfloat16, CPU, AVX2)
    assert (slow.compute, slow.weights) == (torch.float32, torch.float32)
    assert "converted at load" in slow.describe()


def test_only_bf16_values_are_kept_bf16() -> None:
    """fp16 has no kernel; an fp8 checkpoint's dequantized values are not bf16 ones; a GPU computes
    in the checkpoint's dtype; fp32 compute is what gets the bf16 weights."""
    assert matmul_weight_dtype(torch.bfloat16, torch.float32, CPU, cap=AVX2) == torch.bfloat16
    assert matmul_weight_dtype(torch.float16, torch.float32, CPU, cap=AVX2) == torch.float32
    assert matmul_weight_dtype(torch.bfloat16, torch.float32, CPU, quantized=True, cap=AVX2) == torch.float32
    assert matmul_weight_dtype(torch.bfloat16, torch.float32, torch.device("cuda"), cap=AVX2) == torch.float32
    assert matmul_weight_dtype(torch.bfloat16, torch.float32, CPU, cap=AVX512_BF16) == torch.float32
    assert matmul_weight_dtype(torch.bfloat16, torch.bfloat16, CPU, cap=AVX2) == torch.bfloat16


def test_fp16_needs_native_fp16_not_bf16() -> None:
    assert choose_dtype(torch.float16, CPU, AVX512_BF16).compute == torch.float32


def test_a_gpu_computes_in_the_checkpoints_dtype() -> None:
    assert choose_dtype(torch.bfloat16, torch.device("cuda"), AVX2).compute == torch.bfloat16


def test_an_explicit_dtype_wins_and_a_bad_one_is_named(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "m", PRESETS["tiny"], torch.bfloat16)
    choice = resolve_dtype("float16", path, CPU)
    assert (choice.checkpoint, choice.compute) == (torch.bfloat16, torch.float16)
    with pytest.raises(ValueError, match="expected auto or one of"):
        resolve_dtype("int8", path, CPU)


def test_the_checkpoint_dtype_comes_from_config_then_the_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert checkpoint_dtype(tmp_path) == torch.float16
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert checkpoint_dtype(tmp_path) == torch.bfloat16
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_dtype(tmp_path) == torch.float32  # nothing to go by: the safe choice
    save_file(
        {"model.embed_tokens.weight": torch.zeros(4, 2, dtype=torch.bfloat16)}, tmp_path / "model.safetensors"
    )
    assert checkpoint_dtype(tmp_path) == torch.bfloat16


# -- the commands ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("bf16") / "tiny", PRESETS["tiny"], torch.bfloat16)


def _generate(path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moeserve.workers.cli.main", "generate", "--model", str(path)]
        + ["--prompt-ids", "5,6,7", "--max-tokens", "6", "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def _tokens(done: subprocess.CompletedProcess[str]) -> list[int]:
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout)["token_ids"])


def test_generate_defaults_to_auto_prints_the_choice_and_computes_in_it(bf16_checkpoint: Path) -> None:
    expected = choose_dtype(torch.bfloat16, CPU, cpu_capability()).compute
    auto = _generate(bf16_checkpoint)
    line = DTYPE_LINE.search(auto.stderr)
    assert line, auto.stderr
    assert line.group(1) == "bfloat16" and line.group(2) == str(expected).removeprefix("torch.")
    explicit = _generate(bf16_checkpoint, "--dtype", line.group(2))
    assert "given explicitly with --dtype" in explicit.stderr
    assert _tokens(auto) == _tokens(explicit)


def test_an_avx2_host_computes_a_bf16_checkpoint_in_fp32_on_bf16_weights(bf16_checkpoint: Path) -> None:
    avx2 = {"ATEN_CPU_CAPABILITY": "avx2"}
    auto = _generate(bf16_checkpoint, env=avx2)
    line = DTYPE_LINE.search(auto.stderr)
    assert line and line.group(2) == "float32" and line.group(3) == "bfloat16", auto.stderr
    assert "widened to fp32 in registers" in auto.stderr and "CPU dispatch AVX2" in auto.stderr
    # the same values as fp32 weights: the same tokens as fp32 on this host's own dispatch
    assert _tokens(auto) == _tokens(_generate(bf16_checkpoint, "--dtype", "float32"))
    assert _tokens(auto) == _tokens(_generate(bf16_checkpoint, "--dtype", "float32", env=avx2))


def test_a_checkpoint_whose_dtype_cannot_be_read_exits_2(bf16_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((bf16_checkpoint / "config.json").read_text())
    config = json.loads((broken / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors.index.json").write_text("{not json")
    done = _generate(broken)
    assert done.returncode == 2, done.stderr
    assert "--dtype auto: cannot read the checkpoint's dtype" in done.stderr


def test_serve_prints_its_choice_before_it_listens(bf16_checkpoint: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeserve.workers.cli.main", "serve", "--model", str(bf16_checkpoint)]
        + ["--host", "127.0.0.1", "--port", "0", "--no-metrics", "--no-http", "--max-model-len", "64"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        first = proc.stderr.readline()
        assert DTYPE_LINE.search(first) and "compute float32" in first, first
        assert "listening on 127.0.0.1:" in proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# -- the Ray app and the operator: `dtype: auto` decided on the ranks' host ----------------------

_RANK_SPEC_CHOICE = """
import sys
from pathlib import Path
import torch
from moeserve.engine_settings import EngineSettings
from moeserve.workers.parallel.settings import EPSettings
from moeserve.workers.ranks.serving import ServingRankSpec
ep = EPSettings(1, 1, dtype=torch.bfloat16)
spec = ServingRankSpec(Path(sys.argv[1]), ep, EngineSettings(), auto_dtype=True)
chosen = spec.for_this_host()
assert not chosen.auto_dtype and chosen.for_this_host() is chosen
print(str(chosen.ep.dtype).removeprefix("torch."))
"""


def _rank_spec_choice(path: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _RANK_SPEC_CHOICE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_rank_spec_with_auto_dtype_is_decided_for_the_host_it_runs_on(bf16_checkpoint: Path) -> None:
    """What attention rank 0's actor does before any rank loads (`RankWorld.start`)."""
    here = str(choose_dtype(torch.bfloat16, CPU, cpu_capability()).compute).removeprefix("torch.")
    assert _rank_spec_choice(bf16_checkpoint, {}) == here
    assert _rank_spec_choice(bf16_checkpoint, {"ATEN_CPU_CAPABILITY": "avx2"}) == "float32"


def test_auto_is_the_serve_configs_default_and_a_bad_dtype_is_named() -> None:
    from moeserve.serve_config import ModelSpec, ServeAppConfig, ServeConfigError

    assert ServeAppConfig().model.dtype == "auto"
    with pytest.raises(ServeConfigError, match=r"^model.dtype: must be one of auto, bfloat16"):
        ServeAppConfig(model=ModelSpec(dtype="int8")).validate()  # type: ignore[arg-type]
