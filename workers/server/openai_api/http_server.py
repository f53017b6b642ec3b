"""uvicorn serving an ASGI app on a socket bound here (so port 0 reports the port it got), inside
the serving process's event loop; the process, not uvicorn, owns SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI

STARTUP_TIMEOUT_S = 30.0


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # `app.serve` stops everything in order on a signal; uvicorn must not act on its own


class HTTPServer:
    def __init__(self, app: FastAPI, host: str, port: int):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)
        self.port = int(self.socket.getsockname()[1])
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
        )
        self.server = _Uvicorn(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
        while not self.server.started:  # uvicorn offers no event for it
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the HTTP server did not start in {STARTUP_TIMEOUT_S} s")
            await asyncio.sleep(0.01)

    async def stop(self, timeout: float = 2.0) -> None:
        if self.task is None:
            self.socket.close()
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except asyncio.TimeoutError:
            self.server.force_exit = True
            await self.task
        self.socket.close()
