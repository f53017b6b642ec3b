"""`moeserve.v1.Inference` on grpc.aio: validates, submits to the engine loop, streams its outputs.

Failures map to status codes with a message: INVALID_ARGUMENT (bad field, named; a request that is
not a valid message, see `InvalidMessageInterceptor`), RESOURCE_EXHAUSTED (queue full), UNAVAILABLE
(loading, load failed, stopping, a rank of the instance lost), DEADLINE_EXCEEDED, INTERNAL (the
engine failed, or this request alone failed). A stream that ends early for any reason (client
cancel, disconnect, deadline) aborts its engine request, which frees its KV blocks before the next
step. Only the size checks run on the event loop; tokenizing, validating and submitting a request
run on a worker thread.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from moeserve.v1 import inference_pb2 as pb
from moeserve.v1 import inference_pb2_grpc as pb_grpc
from moeserve.workers.engine.core import Engine
from moeserve.workers.engine.loop import EngineFailed, EngineStopped, QueueFull
from moeserve.workers.engine.request import AbortCause, InvalidRequest, RequestOutput, SamplingParams, Sink
from moeserve.workers.model.tokenizer import Tokenizer
from moeserve.workers.server.convert import check_sizes, to_engine, to_response

# How a stream ends for each abort cause ("cancelled" and "stopping" end with FINISH_REASON_ABORT).
ABORT_STATUS: dict[AbortCause, tuple[grpc.StatusCode, str]] = {
    "deadline": (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"),
    "unavailable": (grpc.StatusCode.UNAVAILABLE, "model instance unavailable"),
    "failed": (grpc.StatusCode.INTERNAL, "engine failed"),
    "error": (grpc.StatusCode.INTERNAL, "request failed"),
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "invalid request"),
    "queue_full": (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
}


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
        engine = backend.loop.engine

        def prepare_and_submit() -> int:  # worker thread: tokenizing and validating take time
            job = to_engine(request, engine, backend.tokenizer)
            return backend.loop.submit(job.prompt_ids, job.sampling, sink, request.request_id, deadline)

        try:
            check_sizes(request, engine.settings.limits)  # cheap, before anything proportional to size
            submitted = loop.run_in_executor(None, prepare_and_submit)
            try:
                key = await asyncio.shield(submitted)
            except asyncio.CancelledError:  # the client left: abort the request once it is submitted
                submitted.add_done_callback(
                    lambda f: backend.loop.abort(f.result()) if f.exception() is None else None
                )
                raise
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
        finished, first = False, True
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                if out.abort_cause in ABORT_STATUS:
                    code, what = ABORT_STATUS[out.abort_cause]
                    await context.abort(code, f"{what}: {out.error}" if out.error else what)
                yield to_response(out, first)
                first = False
        finally:
            if not finished:
                backend.loop.abort(key)
            self.state.in_flight -= 1
            if self.state.in_flight == 0:
                self.state.idle.set()


class InvalidMessage:
    """What a request's bytes deserialize to when they are not a valid message (or hold invalid
    UTF-8 in a string field); the handler answers INVALID_ARGUMENT instead of running."""

    def __init__(self, details: str):
        self.details = details


class InvalidMessageInterceptor(grpc.aio.ServerInterceptor):
    """Every unary-request method of the server: bytes that do not parse give INVALID_ARGUMENT
    (grpc's own handling would answer UNKNOWN with the parser's exception)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler: Any = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        name = handler_call_details.method  # type: ignore[attr-defined]

        def tolerant(data: bytes) -> object:
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - any parse failure is the client's bad message
                return InvalidMessage(f"request: not a valid message for {name} ({type(e).__name__})")

        if handler.response_streaming:
            return handler._replace(
                request_deserializer=tolerant, unary_stream=_checked_stream(handler.unary_stream)
            )
        return handler._replace(
            request_deserializer=tolerant, unary_unary=_checked_unary(handler.unary_unary)
        )


def _checked_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def unary(request: object, context: grpc.aio.ServicerContext) -> object:
        if isinstance(request, InvalidMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return unary


def _checked_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            if isinstance(request, InvalidMessage):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            async for item in behavior(request, context):
                yield item

        return stream

    async def writer(request: object, context: grpc.aio.ServicerContext) -> None:  # context.write API
        if isinstance(request, InvalidMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        await behavior(request, context)

    return writer
