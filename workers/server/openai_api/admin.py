"""The expert-balancing admin routes beside the OpenAI API: `GET /admin/experts/map` and
`POST /admin/experts/rebalance` (one EPLB check on every rank of each model instance, answered once
it has run).

They reach the model instances through the request loop's `ExpertControl` side: `EPFrontend` (local
rank processes: one instance) or `ServeRequestLoop` (Ray Serve: every ready instance). A loop
without it (the single-process engine) has no expert ranks, and both routes answer 404 saying so.
The blocking waits run on this app's own small thread pool, never on the event loop nor on the pool
that prepares generation requests. Not part of OpenAI's API; its error shape, though. No
authentication, as the rest of this HTTP server: keep it behind a gateway.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from moeserve.workers.engine.loop import EngineFailed, EngineStopped
from moeserve.workers.server.openai_api.convert import ApiError, bad
from moeserve.workers.server.openai_api.generation import serving_backend
from moeserve.workers.server.servicer import ServingState

DEFAULT_TIMEOUT_S = 60.0  # how long a rebalance request waits for its check, unless it says
MAX_TIMEOUT_S = 600.0
MAX_ADMIN_BODY_BYTES = 4096  # {"timeout_s": ...} is all a body may say
ADMIN_THREADS = 2  # concurrent admin waits; more queue here instead of starving the request pool


@runtime_checkable
class ExpertControl(Protocol):
    """What a request loop of an expert-parallel server offers the admin routes (blocking calls)."""

    def expert_map(self) -> dict[str, Any]:
        """{"instances": [{"instance", "rebalances", "checks", "interval", "min_gain", "layers"}]}."""
        ...

    def request_rebalance(self, timeout_s: float) -> dict[str, Any]:
        """The same, after one rebalance check ran on every instance, each with `changed`; raises
        TimeoutError past `timeout_s`, EngineFailed or EngineStopped when nothing can answer."""
        ...


def add_admin_routes(app: FastAPI, state: ServingState) -> None:
    pool = ThreadPoolExecutor(ADMIN_THREADS, thread_name_prefix="moeserve-admin")

    def control() -> ExpertControl:
        loop = serving_backend(state).loop  # 503 while loading or stopping
        if not isinstance(loop, ExpertControl):
            message = (
                "this server has no expert ranks: /admin/experts/* needs `moeserve serve --expert-ranks N`"
            )
            raise ApiError(404, message, None, "no_expert_ranks")
        return loop

    async def answer(call: Callable[[], dict[str, Any]]) -> JSONResponse:
        try:
            return JSONResponse(await asyncio.get_running_loop().run_in_executor(pool, call))
        except TimeoutError as e:
            raise ApiError(504, str(e), None, "timeout") from None
        except (EngineFailed, EngineStopped) as e:
            raise ApiError(503, str(e), None, "not_serving") from None

    @app.get("/admin/experts/map")
    async def expert_map() -> JSONResponse:
        return await answer(control().expert_map)

    @app.post("/admin/experts/rebalance")
    async def rebalance(request: Request) -> JSONResponse:
        ctl = control()
        timeout_s = rebalance_timeout(await read_small_body(request))
        return await answer(lambda: ctl.request_rebalance(timeout_s))


async def read_small_body(request: Request) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ADMIN_BODY_BYTES:
            raise ApiError(413, f"body: more than {MAX_ADMIN_BODY_BYTES} bytes", None, "request_too_large")
    return body


def rebalance_timeout(body: bytes) -> float:
    """`timeout_s` of a rebalance request's optional JSON body (seconds, in (0, MAX_TIMEOUT_S])."""
    if not body.strip():
        return DEFAULT_TIMEOUT_S
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "body: not valid JSON", None, "invalid_json") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "body: expected a JSON object", None, "invalid_value")
    unknown = sorted(set(raw) - {"timeout_s"})
    if unknown:
        raise bad(unknown[0], "unknown parameter (only timeout_s)")
    value = raw.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_TIMEOUT_S:
        raise bad("timeout_s", f"must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {value!r}")
    return float(value)
