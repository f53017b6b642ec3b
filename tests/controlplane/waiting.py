"""Polling with a deadline, shared by the control plane and the k8s tests.

Only this: call a check until it returns something truthy, ignoring the errors a starting or
converging cluster gives, and raise `TimeoutError` naming what was awaited. No retries of side effects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    what: str,
    check: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.25,
    ignore: tuple[type[BaseException], ...] = (OSError,),
    abort: Callable[[], str | None] | None = None,
) -> T:
    """Return the first truthy result of `check` within `timeout_s` seconds.

    Exceptions of the `ignore` types count as "not yet". `abort`, if given, is asked before every
    try and ends the wait with RuntimeError when it returns a reason (e.g. "etcd exited").
    """
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        reason = abort() if abort else None
        if reason:
            raise RuntimeError(f"{reason} while waiting for {what}")
        try:
            result = check()
            if result:
                return result
        except ignore as err:
            last_error = err
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}{detail}")
        time.sleep(interval_s)
