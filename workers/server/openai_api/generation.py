"""One API request's engine requests (one per choice): prepared and submitted on a worker thread,
their outputs gathered on the event loop, aborted when the consumer leaves early.

Shares `ServingState` with the gRPC servicer: the same not-serving answers, the same in-flight
count that a graceful stop waits on.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable

from moeserve.workers.engine.loop import EngineFailed, EngineStopped, QueueFull
from moeserve.workers.engine.request import RequestOutput
from moeserve.workers.server.openai_api.convert import ApiError, Prepared
from moeserve.workers.server.servicer import Backend, ServingState

# How a choice's engine request ending early is answered (the gRPC servicer's ABORT_STATUS, in HTTP).
ABORT_ERRORS: dict[str, tuple[int, str]] = {
    "deadline": (504, "deadline exceeded"),
    "unavailable": (503, "model instance unavailable"),
    "failed": (500, "engine failed"),
    "error": (500, "request failed"),
    "invalid": (400, "invalid request"),
    "queue_full": (429, "queue full"),
    "stopping": (503, "server is stopping"),
    "cancelled": (503, "request cancelled"),
}


def serving_backend(state: ServingState) -> Backend:
    """The backend, or 503 saying why nothing is served."""
    if state.stopping:
        raise ApiError(503, "server is stopping", code="not_serving")
    if state.backend is None:
        why = f"model failed to load: {state.load_error}" if state.load_error else "model is loading"
        raise ApiError(503, why, code="not_serving")
    if not state.backend.loop.alive:
        raise ApiError(503, "engine is not running", code="not_serving")
    return state.backend


class Generation:
    """Submitted choices of one request; iterate `outputs()` once, to the end or until it is closed."""

    def __init__(
        self,
        state: ServingState,
        backend: Backend,
        prepared: Prepared,
        keys: list[int],
        queue: asyncio.Queue[tuple[int, RequestOutput]],
    ):
        self.state = state
        self.backend = backend
        self.prepared = prepared
        self.keys = keys
        self.queue = queue
        self.id = secrets.token_hex(12)

    @classmethod
    async def start(cls, state: ServingState, prepare: Callable[[Backend], Prepared]) -> Generation:
        backend = serving_backend(state)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

        def sink_for(index: int) -> Callable[[RequestOutput], None]:
            def sink(out: RequestOutput) -> None:  # engine thread
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, out))
                except RuntimeError:  # event loop closed: the response is gone already
                    pass

            return sink

        def prepare_and_submit() -> tuple[Prepared, list[int]]:  # worker thread
            prepared = prepare(backend)
            keys: list[int] = []
            try:
                for c in prepared.choices:
                    keys.append(backend.loop.submit(c.job.prompt_ids, c.job.sampling, sink_for(c.index)))
            except BaseException:
                for key in keys:  # all choices or none
                    backend.loop.abort(key)
                raise
            return prepared, keys

        submitted = loop.run_in_executor(None, prepare_and_submit)
        try:
            prepared, keys = await asyncio.shield(submitted)
        except asyncio.CancelledError:  # the client left: abort what gets submitted
            submitted.add_done_callback(
                lambda f: [backend.loop.abort(k) for k in f.result()[1]] if f.exception() is None else None
            )
            raise
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), code="not_serving") from None
        except EngineFailed as e:
            raise ApiError(500, str(e), code="engine_failed") from None
        return cls(state, backend, prepared, keys, queue)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) until every choice finished; an early end aborts the rest."""
        unfinished = set(range(len(self.keys)))
        self.state.in_flight += 1  # here, not at submit: a stream never started must not hold a stop
        self.state.idle.clear()
        try:
            while unfinished:
                index, out = await self.queue.get()
                if out.abort_cause is not None:
                    status, what = ABORT_ERRORS[out.abort_cause]
                    unfinished.discard(index)
                    message = f"{what}: {out.error}" if out.error else what
                    raise ApiError(status, message, code=out.abort_cause)
                if out.finished:
                    unfinished.discard(index)
                    self.prepared.cached[index] = out.cached_prompt_tokens  # for `usage`
                yield index, out
        finally:
            for index in unfinished:
                self.backend.loop.abort(self.keys[index])
            self.state.in_flight -= 1
            if self.state.in_flight == 0:
                self.state.idle.set()
