"""The OpenAI HTTP API behind Ray Serve's HTTP proxy: the standalone server's FastAPI app (same
routes, parsing, limits and error shapes: `server.openai_api`), over a request loop whose engine
requests are streams from the `ModelInstance` deployment instead of a local engine.

`ServeRequestLoop` is the `RequestLoop` the app's `Backend` needs: `submit` is called on a worker
thread and starts the stream on the ingress replica's event loop; `abort` cancels it, which ends the
`ModelInstance` generator and aborts the engine request on its attention rank (KV blocks freed).
Its `expert_map` / `request_rebalance` (the `/admin/experts/*` routes) reach every ready instance
directly, through the attention rank 0 actor each reports to `InstanceHealth`: Serve's router would
pick one instance per call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any

import ray
from ray.serve.handle import DeploymentHandle

from moeserve.workers.engine.core import Engine
from moeserve.workers.engine.loop import EngineStopped
from moeserve.workers.engine.request import AbortCause, RequestOutput, SamplingParams, Sink

log = logging.getLogger(__name__)
READY_POLL_S = 0.5  # how often `alive` (what /health answers) is refreshed from the instances' readiness
ANSWER_S = 10.0  # how long an admin call waits for the instances beyond its own timeout


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

    # the admin routes (`openai_api.admin.ExpertControl`): every ready model instance answers
    def expert_map(self) -> dict[str, Any]:
        return self._on_loop(self._each_instance("expert_map"), ANSWER_S)

    def request_rebalance(self, timeout_s: float) -> dict[str, Any]:
        return self._on_loop(self._each_instance("request_rebalance", timeout_s), timeout_s + ANSWER_S)

    def _on_loop(self, coro: Coroutine[Any, Any, dict[str, Any]], wait_s: float) -> dict[str, Any]:
        """Run `coro` on the replica's loop; called from the admin routes' thread."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(wait_s)
        except (TimeoutError, concurrent.futures.TimeoutError):  # one class from Python 3.11 on
            if future.done():
                raise  # the instances' own timeout, with their message
            future.cancel()
            raise TimeoutError(f"the model instances did not answer within {wait_s:g} s") from None

    async def _each_instance(self, method: str, *args: Any) -> dict[str, Any]:
        """`method` of every ready instance's attention rank 0 actor, concurrently; an instance that
        fails gets an `error` entry, and if all fail the first failure is raised."""
        controls: dict[str, tuple[str, str]] = await self.health.controls.remote()
        if not controls:
            raise EngineStopped("no model instance is ready")
        names = sorted(controls)

        async def call(name: str) -> dict[str, Any]:
            actor = await asyncio.to_thread(ray.get_actor, *controls[name])  # a GCS lookup: off the loop
            return await getattr(actor, method).remote(*args)  # type: ignore[no-any-return]

        results = await asyncio.gather(*(call(name) for name in names), return_exceptions=True)
        instances: list[dict[str, Any]] = []
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                cause = getattr(result, "cause", None) or result  # a RayTaskError carries the rank's own
                instances.append({"instance": name, "error": f"{type(cause).__name__}: {first_line(cause)}"})
            else:
                instances.append({"instance": name, **result})
        failed = [r for r in results if isinstance(r, BaseException)]
        if len(failed) == len(results):
            cause = getattr(failed[0], "cause", None) or failed[0]
            if isinstance(cause, TimeoutError):
                raise TimeoutError(first_line(cause))
            raise EngineStopped(f"no model instance answered: {first_line(cause)}")
        return {"instances": instances}

    def stop(self, timeout: float | None = 10.0) -> None:
        self._poller.cancel()
        for key in list(self._streams):
            self.abort(key)


def first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:300]
