"""Kernel checks: on CPU tensors in a child process under Triton's interpreter (see interpreter.py),
and on CUDA tensors in this process, compiled, when a GPU is present."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from interpreter import Interpreter  # noqa: E402

from moeserve.workers.kernels.runtime import INSTALL_TRITON, triton_available  # noqa: E402


@pytest.fixture(scope="session")
def interpreter() -> Iterator[Interpreter]:
    if not triton_available():
        pytest.fail(f"the kernel tests need the `triton` package: {INSTALL_TRITON}")
    child = Interpreter()
    yield child
    child.close()
