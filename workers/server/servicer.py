"""`moeserve.v1.Inference` on grpc.aio: validates, submits to the engine loop, streams its outputs.

Failures map to status codes with a message: INVALID_ARGUMENT (bad field, named), RESOURCE_EXHAUSTED
(queue full), UNAVAILABLE (loading, load failed, stopping, a rank of the instance lost),
DEADLINE_EXCEEDED, INTERNAL (engine failed). A stream that ends early for any reason (client cancel,
disconnect, deadline) aborts its engine request, which frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from moeserve.v1 import inference_pb2 as pb
from moeserve.v1 import inference_pb2_grpc as pb_grpc
from moeserve.workers.engine.core import Engine
from moeserve.workers.engine.loop import EngineFailed, EngineStopped, QueueFull
from moeserve.workers.engine.request import AbortCause, InvalidRequest, RequestOutput, SamplingParams, Sink
from moeserve.workers.server.convert import to_engine, to_response
from moeserve.workers.tokenizer import Tokenizer


class RequestLoop(Protocol):
    """What the servicer needs of an engine loop: `EngineLoop`, or a front end of several ranks."""

    @property
    def engine(self) -> Engine:
        """An engine with the served limits; requests are validated against it."""
        ...

    @property
    def alive(self) -> bool: ...

    def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        sink: Sink,
        request_id: str = "",
        deadline: float | None = None,
    ) -> int: ...

    def abort(self, key: int, cause: AbortCause = "cancelled") -> None: ...

    def stop(self, timeout: float | None = 10.0) -> None: ...


@dataclass
class Backend:
    """A loaded model behind the API: its engine loop, tokenizer and description."""

    loop: RequestLoop
    tokenizer: Tokenizer | None
    info: pb.ModelInfo


@dataclass
class ServingState:
    """What the servicer serves; `backend` is None until the model is loaded."""

    backend: Backend | None = None
    load_error: str = ""
    stopping: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, state: ServingState):
        self.state = state
        state.idle.set()

    async def _backend(self, context: grpc.aio.ServicerContext) -> Backend:
        state = self.state
        if state.stopping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is stopping")
        if state.backend is None:
            message = f"model failed to load: {state.load_error}" if state.load_error else "model is loading"
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)
        assert state.backend is not None
        if not state.backend.loop.alive:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine is not running")
        return state.backend

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return (await self._backend(context)).info

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        backend = await self._backend(context)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(out: RequestOutput) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, out)
            except RuntimeError:  # event loop closed: the stream is gone already
                pass

        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            job = to_engine(request, backend.loop.engine, backend.tokenizer)
            key = backend.loop.submit(job.prompt_ids, job.sampling, sink, request.request_id, deadline)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineStopped as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except EngineFailed as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        self.state.in_flight += 1
        self.state.idle.clear()
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                if out.abort_cause == "deadline":
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                if out.abort_cause == "unavailable":
                    message = f"model instance unavailable: {out.error}"
                    await context.abort(grpc.StatusCode.UNAVAILABLE, message)
                if out.abort_cause == "failed":
                    await context.abort(grpc.StatusCode.INTERNAL, f"engine failed: {out.error}")
                yield to_response(out)
        finally:
            if not finished:
                backend.loop.abort(key)
            self.state.in_flight -= 1
            if self.state.in_flight == 0:
                self.state.idle.set()
