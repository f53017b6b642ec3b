"""The OpenAI HTTP API behind Ray Serve's HTTP proxy: the standalone server's FastAPI app (same
routes, parsing, limits and error shapes: `server.openai_api`), over a request loop whose engine
requests are streams from the `ModelInstance` deployment instead of a local engine.

`ServeRequestLoop` is the `RequestLoop` the app's `Backend` needs: `submit` is called on a worker
thread and starts the stream on the ingress replica's event loop; `abort` cancels it, which ends the
`ModelInstance` generator and aborts the engine request on its attention rank (KV blocks freed).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import Future
from typing import Any

from ray.serve.handle import DeploymentHandle

from moeserve.workers.engine.core import Engine
from moeserve.workers.engine.request import AbortCause, RequestOutput, SamplingParams, Sink

log = logging.getLogger(__name__)
READY_POLL_S = 0.5  # how often `alive` (what /health answers) is refreshed from the instances' readiness


class ServeRequestLoop:
    """Engine requests of the HTTP API as streams from model instances; validation against `engine`."""

    def __init__(self, engine: Engine, model: DeploymentHandle, health: DeploymentHandle):
        self._engine = engine
        self.model = model
        self.health = health
        self.loop = asyncio.get_running_loop()
        self._keys = itertools.count(1)
        self._streams: dict[int, Future[None]] = {}
        self._ready = False
        self._poller = self.loop.create_task(self._poll_ready())

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def alive(self) -> bool:
        """At least one model instance is ready (as Serve's gRPC health check's `/available`)."""
        return self._ready

    async def _poll_ready(self) -> None:
        while True:
            try:
                _, ready = await self.health.ready_instances.remote()
                self._ready = ready >= 1
            except Exception:  # noqa: BLE001 - the health deployment restarts; poll again
                log.warning("readiness poll failed", exc_info=True)
                self._ready = False
            await asyncio.sleep(READY_POLL_S)

    def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        sink: Sink,
        request_id: str = "",
        deadline: float | None = None,
    ) -> int:
        """Called off the event loop (the app prepares requests on a worker thread)."""
        key = next(self._keys)
        # the engine's deadlines are on the monotonic clock; Serve's instance wants a timeout
        timeout_s = None if deadline is None else max(0.0, deadline - time.monotonic())
        coro = self._stream(key, prompt_ids, sampling, sink, request_id, timeout_s)
        self._streams[key] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return key

    async def _stream(
        self,
        key: int,
        prompt_ids: list[int],
        sampling: SamplingParams,
        sink: Sink,
        request_id: str,
        timeout_s: float | None,
    ) -> None:
        try:
            stream: Any = self.model.options(stream=True).generate.remote(
                prompt_ids, sampling, request_id, timeout_s
            )
            async for out in stream:
                sink(out)
        except asyncio.CancelledError:
            raise  # aborted: the consumer is gone, nothing to tell it
        except Exception as e:  # noqa: BLE001 - a lost replica fails this request alone
            log.warning("request %s failed in Ray Serve", request_id or key, exc_info=True)
            sink(RequestOutput(request_id, [], "", "abort", abort_cause="unavailable", error=str(e)))
        finally:
            self._streams.pop(key, None)

    def abort(self, key: int, cause: AbortCause = "cancelled") -> None:
        stream = self._streams.pop(key, None)
        if stream is not None:
            stream.cancel()  # thread-safe; cancels the task on the replica's loop

    def stop(self, timeout: float | None = 10.0) -> None:
        self._poller.cancel()
        for key in list(self._streams):
            self.abort(key)
