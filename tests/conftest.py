"""Shared fixtures: reference checkpoints written once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from builders import (  # noqa: E402
    REFERENCE_CONFIGS,
    reference_model,
    write_bf16_reference_checkpoint,
    write_reference_checkpoint,
)
from prerequisites import missing_message, missing_modules  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Fail the whole run, before collection, when a package some tier needs is missing."""
    missing = missing_modules()
    if missing:
        raise pytest.UsageError(missing_message(missing))


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {name: write_reference_checkpoint(name, root / name) for name in REFERENCE_CONFIGS}
    paths["v2_sharded"] = write_reference_checkpoint("v2", root / "v2_sharded", max_shard_size="40KB")
    return paths


@pytest.fixture(scope="session")
def reference_models() -> dict[str, object]:
    return {name: reference_model(name) for name in REFERENCE_CONFIGS}


@pytest.fixture(scope="session")
def bf16_references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    """name -> (bf16 checkpoint, transformers model in fp32 holding its exact values)."""
    root = tmp_path_factory.mktemp("bf16_checkpoints")
    return {name: write_bf16_reference_checkpoint(name, root / name) for name in REFERENCE_CONFIGS}
