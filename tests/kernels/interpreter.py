"""A child Python process in which Triton interprets every kernel, for checks on CPU tensors.

Triton reads `TRITON_INTERPRET` when `@triton.jit` decorates a function, its own library functions
(`tl.zeros`, `tl.max`, ...) included, which happens when Triton is first imported. In the pytest
process Triton is imported by whatever gets there first (transformers, torch.compile), and a
process-wide `TRITON_INTERPRET=1` would also turn the GPU tier's kernels into interpreted ones. So
the kernel checks run in one spawned child whose environment has `TRITON_INTERPRET=1` before it
imports anything: `_enable` runs as the pool's initializer, before any task is unpickled (unpickling
a check imports its module, torch and the kernels). This module imports nothing heavy itself.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

CHECK_TIMEOUT_S = 300  # one check on a busy 2-core machine takes seconds; this only ends a hang


def _enable() -> None:
    os.environ["TRITON_INTERPRET"] = "1"


def _interpreting() -> bool:
    import triton.runtime.interpreter as interpreter
    from triton import jit

    return isinstance(jit(_enable), interpreter.InterpretedFunction)


class Interpreter:
    """Runs module-level check functions in the child and re-raises their failures here."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_enable
            )
            if not self._pool.submit(_interpreting).result(timeout=CHECK_TIMEOUT_S):
                raise RuntimeError("the child process does not run Triton's interpreter")
        return self._pool

    def run(self, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return self._executor().submit(check, *args, **kwargs).result(timeout=CHECK_TIMEOUT_S)
        except BrokenProcessPool:  # the child died (say, a crash in a kernel): the next check gets a new one
            self.close()
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
