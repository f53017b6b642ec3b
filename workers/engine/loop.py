"""`EngineLoop`: runs an `Engine` on its own thread; other threads submit and abort requests.

Submissions and aborts go through a lock-protected inbox that the engine thread drains before each
step, so the engine itself stays single-threaded. The waiting queue is bounded (`QueueFull`), an
abort frees the request's blocks before the next step, deadlines are checked every iteration, and
an exception that escapes a step (the forward or scheduling; one request's sampling or text fails
only that request, see `Engine`) fails every request, marks the loop failed and ends the thread (the
server then reports NOT_SERVING). Nothing here knows about gRPC.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from moeserve.workers.engine.core import Engine
from moeserve.workers.engine.request import AbortCause, Request, SamplingParams, Sink

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound."""


class EngineStopped(RuntimeError):
    """The loop is stopping or stopped."""


class EngineFailed(RuntimeError):
    """A step raised; the loop serves nothing more."""


class EngineLoop:
    def __init__(self, engine: Engine, on_failure: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.on_failure = on_failure
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._aborts: list[tuple[int, AbortCause]] = []
        self._num_waiting = 0  # inbox + engine's waiting queue, as of the last drain or step
        self._stopping = False
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="moeserve-engine", daemon=True)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def num_waiting(self) -> int:
        """Requests queued but not running (approximate when read off the engine thread)."""
        return len(self._inbox) + len(self.engine.scheduler.waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None and not self._stopping

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        sink: Sink,
        request_id: str = "",
        deadline: float | None = None,
    ) -> int:
        """Queue a request; returns its key for `abort`. Raises InvalidRequest, QueueFull,
        EngineStopped or EngineFailed. `sink` is called on the engine thread."""
        request = self.engine.make_request(prompt_ids, sampling, sink, request_id, deadline)
        with self._cond:
            if self.failure is not None:
                raise EngineFailed(f"engine failed: {self.failure!r}")
            if self._stopping:
                raise EngineStopped("engine is stopping")
            if self._num_waiting >= self.engine.settings.max_waiting:
                raise QueueFull(f"waiting queue is full ({self.engine.settings.max_waiting} requests)")
            self._inbox.append(request)
            self._num_waiting += 1
            self._cond.notify()
        return request.key

    def abort(self, key: int, cause: AbortCause = "cancelled") -> None:
        with self._cond:
            self._aborts.append((key, cause))
            self._cond.notify()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Abort everything still queued or running, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _drain_inbox(self) -> tuple[list[Request], list[tuple[int, AbortCause]], bool]:
        """(new requests, aborts, stopping), taking the requests and aborts out of the inbox."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
            return inbox, aborts, self._stopping

    def mark_stopping(self) -> None:
        with self._cond:
            self._stopping = True

    def idle(self, seconds: float) -> None:
        """Wait up to `seconds`, less if a request, an abort or a stop arrives."""
        with self._cond:
            if not (self._inbox or self._aborts or self._stopping):
                self._cond.wait(seconds)

    def count_waiting(self) -> None:
        """Refresh the waiting count (inbox + the engine's waiting queue) before outputs go out."""
        with self._cond:
            self._num_waiting = len(self._inbox) + len(self.engine.scheduler.waiting)

    def _next_deadline(self) -> float | None:
        deadlines = [r.deadline for r in self.engine.requests.values() if r.deadline is not None]
        return min(deadlines, default=None)

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._aborts or self._stopping or engine.has_work):
                        deadline = self._next_deadline()
                        self._cond.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                        if deadline is not None and time.monotonic() >= deadline:
                            break
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                    stopping = self._stopping
                for request in inbox:
                    engine.add(request)
                for key, cause in aborts:
                    engine.abort(key, cause)
                if stopping:
                    engine.abort_all("stopping")
                    return
                engine.expire(time.monotonic())
                plan = engine.scheduler.schedule() if engine.has_work else None
                with self._cond:  # before any output goes out, so a client reacting to one sees the count
                    self._num_waiting = len(self._inbox) + len(engine.scheduler.waiting)
                if plan is not None:
                    engine.execute(plan)
        except BaseException as e:  # noqa: BLE001 - every failure must reach the requests and the health check
            log.exception("engine step failed")
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        """Record the failure (new submits are refused from now on), end every request, queued ones
        too, as "failed", and tell the owner."""
        with self._cond:
            self.failure = error
            inbox, self._inbox = self._inbox, []
        for request in inbox:
            self.engine.add(request)
        try:
            self.engine.abort_all("failed", repr(error))
        finally:
            if self.on_failure is not None:
                self.on_failure(error)
