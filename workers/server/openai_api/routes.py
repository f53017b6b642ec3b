"""The FastAPI app of the OpenAI API: /v1/models, /v1/completions, /v1/chat/completions, /health,
/metrics (and the expert-balancing routes of `admin`). Bodies are read here (bounded by
`MAX_BODY_BYTES`) and parsed, validated and tokenized on a worker thread; streams are server-sent
events that end with `data: [DONE]`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from moeserve.workers.server.openai_api.admin import add_admin_routes
from moeserve.workers.server.openai_api.chat_template import ChatTemplate
from moeserve.workers.server.openai_api.convert import (
    MAX_BODY_BYTES,
    ApiError,
    Prepared,
    prepare_chat,
    prepare_completion,
)
from moeserve.workers.server.openai_api.generation import Generation, serving_backend
from moeserve.workers.server.openai_api.responses import ChoiceText, ResponseBuilder
from moeserve.workers.server.servicer import Backend, ServingState


@dataclass(frozen=True)
class HTTPOptions:
    """The OpenAI HTTP API of a serving process: its port and what it calls the model."""

    port: int = 8000  # 0 picks a free one
    served_model_name: str | None = None  # None: the backend's model name (its directory's name)
    chat_template: ChatTemplate | None = None  # None: the model has none (chat answers 400)


async def read_body(request: Request) -> list[bytes]:
    """The body's chunks (joined off the loop), or 413 past `MAX_BODY_BYTES`."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"body: more than {MAX_BODY_BYTES} bytes", None, "request_too_large")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return chunks


async def disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body is read already, so the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(state: ServingState, registry: CollectorRegistry | None, config: HTTPOptions) -> FastAPI:
    """The app; `registry` None: no `/metrics` route here (Ray Serve exports metrics per node)."""
    app = FastAPI(title="moeserve", docs_url=None, redoc_url=None, openapi_url=None)

    def model_name(backend: Backend) -> str:
        return config.served_model_name or backend.info.model_name

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            serving_backend(state)
        except ApiError as e:
            return JSONResponse({"status": "not_serving", "reason": e.message}, status_code=503)
        return JSONResponse({"status": "serving"})

    if registry is not None:

        @app.get("/metrics")
        async def metrics() -> Response:
            data = await asyncio.to_thread(generate_latest, registry)
            return Response(data, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        backend = serving_backend(state)
        entry = {
            "id": model_name(backend),
            "object": "model",
            "created": 0,
            "owned_by": "moeserve",
            "max_model_len": backend.info.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [entry]})

    async def generate(request: Request, prepare: Callable[[Backend, bytes], Prepared]) -> Response:
        chunks = await read_body(request)
        generation = await Generation.start(state, lambda b: prepare(b, b"".join(chunks)))
        builder = ResponseBuilder(
            generation.prepared, model_name(generation.backend), generation.backend.tokenizer, generation.id
        )
        if generation.prepared.request.stream:
            return StreamingResponse(stream(generation, builder), media_type="text/event-stream")
        choices = [ChoiceText() for _ in generation.prepared.choices]

        async def gather() -> None:
            async for index, out in generation.outputs():
                c = choices[index]
                c.text += out.text
                c.token_ids.extend(out.token_ids)
                c.logprobs.extend(out.logprobs)
                c.finish_reason = out.finish_reason

        gathering = asyncio.create_task(gather())
        left = asyncio.create_task(disconnected(request))
        await asyncio.wait({gathering, left}, return_when=asyncio.FIRST_COMPLETED)
        left.cancel()
        if not gathering.done():  # the client left: cancelling aborts its requests
            gathering.cancel()
            return Response(status_code=499)
        gathering.result()  # raises an ApiError that ended it
        body = await asyncio.to_thread(builder.whole, choices)
        return Response(body, media_type="application/json")

    async def stream(generation: Generation, builder: ResponseBuilder) -> AsyncIterator[bytes]:
        if builder.chat:
            for chunk in builder.role_chunks():
                yield chunk
        started: set[int] = set()
        completion_tokens = 0
        try:
            async for index, out in generation.outputs():
                completion_tokens += len(out.token_ids)
                yield builder.chunk(index, out, index not in started)
                started.add(index)
        except ApiError as e:  # headers are sent: the error is the stream's last event
            yield builder.event(e.body())
            return
        options = generation.prepared.request.stream_options
        if options is not None and options.include_usage:
            yield builder.usage_chunk(completion_tokens)
        yield b"data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        def prepare(backend: Backend, body: bytes) -> Prepared:
            engine = backend.loop.engine
            return prepare_completion(body, model_name(backend), engine, backend.tokenizer)

        return await generate(request, prepare)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        def prepare(backend: Backend, body: bytes) -> Prepared:
            engine = backend.loop.engine
            return prepare_chat(body, model_name(backend), engine, backend.tokenizer, config.chat_template)

        return await generate(request, prepare)

    add_admin_routes(app, state)  # /admin/experts/*: 404 without expert ranks
    return app
