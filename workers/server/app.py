"""Serving process assembly: load a model into an engine, build the gRPC server, run, stop gracefully.

With `Listen.http`, the OpenAI HTTP API (`openai_api`) serves beside gRPC on the same state and
engine. `create_server(address, state)` is the gRPC factory (Inference + Health, bound, not started).
`InferenceServer` owns the lifecycle: it listens at once with health NOT_SERVING, loads the model in
a worker thread, turns SERVING when the engine runs, and NOT_SERVING if the engine fails. `serve()`
runs it until SIGTERM/SIGINT; `BackgroundServer` runs it on a thread (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import start_http_server

from moeserve import contract
from moeserve.engine_settings import EngineSettings
from moeserve.serve_config import Fp8Weights
from moeserve.v1 import inference_pb2_grpc as pb_grpc
from moeserve.workers.engine.core import Engine
from moeserve.workers.engine.loop import EngineLoop
from moeserve.workers.engine.prefix_cache import model_cache_salt
from moeserve.workers.engine.runner import LocalModelRunner
from moeserve.workers.model.tokenizer import Tokenizer
from moeserve.workers.server.convert import model_info
from moeserve.workers.server.metrics import ServingMetrics
from moeserve.workers.server.openai_api.http_server import HTTPServer
from moeserve.workers.server.openai_api.routes import HTTPOptions, create_app
from moeserve.workers.server.servicer import (
    Backend,
    InferenceServicer,
    InvalidMessageInterceptor,
    ServingState,
)

log = logging.getLogger(__name__)
STOP_MARGIN_S = 1.0  # after the grace period: stopping the engine, ending the last streams
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A loader builds the backend; it runs in a worker thread and may take long. The callback is how
# the engine reports a failure later.
Loader = Callable[[ServingMetrics, Callable[[BaseException], None]], Backend]


def local_loader(
    model_path: Path, dtype: torch.dtype, settings: EngineSettings, fp8_weights: Fp8Weights = "dequantize"
) -> Loader:
    """Load a checkpoint directory into a single-process engine (all experts local); `fp8_weights`:
    how an FP8 checkpoint's weights are held (`model/fp8.py`: "dequantize" at load or "keep")."""

    def load(metrics: ServingMetrics, on_failure: Callable[[BaseException], None]) -> Backend:
        from moeserve.workers.model.loader import load_model

        model = load_model(model_path, dtype, fp8_weights=fp8_weights)
        tokenizer = Tokenizer.from_model_dir(model_path)
        mtp = None
        if settings.speculative == "mtp":  # the draft layer beside the model
            from moeserve.workers.model.mtp import load_mtp

            mtp = load_mtp(model_path, model)
        runner = LocalModelRunner(model, settings.num_blocks, settings.block_size, mtp=mtp)
        salt = model_cache_salt(Path(model_path), str(dtype))
        engine = Engine(
            runner, settings, model.config.eos_token_ids, tokenizer, observer=metrics, cache_salt=salt
        )
        loop = EngineLoop(engine, on_failure=on_failure).start()
        metrics.bind(loop, runner.expert_load)
        dtype_name = str(dtype).removeprefix("torch.")
        info = model_info(Path(model_path).name, model.config, engine, dtype_name, tokenizer is not None)
        return Backend(loop, tokenizer, info)

    return load


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for serving gRPC over TLS; with `client_ca`, clients must present a certificate
    signed by it (mutual TLS)."""

    cert: Path
    """Server certificate chain."""
    key: Path
    """The certificate's private key."""
    client_ca: Path | None = None
    """CA bundle that client certificates must chain to; None: no client certificates asked for."""

    def credentials(self) -> grpc.ServerCredentials:
        root = self.client_ca.read_bytes() if self.client_ca is not None else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=root,
            require_client_auth=root is not None,
        )


def create_server(
    address: str,
    state: ServingState,
    health: health_aio.HealthServicer,
    tls: TLSFiles | None = None,
) -> tuple[grpc.aio.Server, int]:
    """An aio server with Inference and Health, bound to `address` (port 0 picks one), plaintext or
    TLS; not started. Requests that are not valid messages get INVALID_ARGUMENT."""
    server = grpc.aio.server(interceptors=[InvalidMessageInterceptor()])
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(state), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if tls is not None:
        port = server.add_secure_port(address, tls.credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC address {address}")
    return server, port


@dataclass(frozen=True)
class Listen:
    host: str = "0.0.0.0"
    port: int = contract.DEFAULT_GRPC_PORT
    metrics_port: int | None = contract.DEFAULT_METRICS_PORT  # None: no metrics endpoint
    tls: TLSFiles | None = None  # None: plaintext gRPC
    http: HTTPOptions | None = None  # None: no OpenAI HTTP API


class InferenceServer:
    """One serving process's gRPC server, engine and metrics endpoint. Use from one event loop."""

    def __init__(self, listen: Listen, loader: Loader):
        self.listen = listen
        self.loader = loader
        self.metrics = ServingMetrics()
        self.state = ServingState()
        self.health = health_aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http: HTTPServer | None = None
        self.loaded = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._metrics_http: object | None = None
        self._load_task: asyncio.Task[None] | None = None

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", contract.INFERENCE_SERVICE):
            await self.health.set(service, status)

    async def start(self) -> None:
        await self._set_health(NOT_SERVING)
        self._server, self.port = create_server(
            f"{self.listen.host}:{self.listen.port}", self.state, self.health, self.listen.tls
        )
        await self._server.start()
        if self.listen.metrics_port is not None:
            http, _ = start_http_server(
                self.listen.metrics_port, self.listen.host, registry=self.metrics.registry
            )
            self._metrics_http = http
            self.metrics_port = int(http.server_port)
        if self.listen.http is not None:  # the OpenAI API, on the same state and engine as gRPC
            app = create_app(self.state, self.metrics.registry, self.listen.http)
            self._http = HTTPServer(app, self.listen.host, self.listen.http.port)
            await self._http.start()
            self.http_port = self._http.port
        self._load_task = asyncio.create_task(self._load())

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()

        def on_failure(error: BaseException) -> None:  # engine thread
            log.error("engine failed: %r; reporting NOT_SERVING", error)
            asyncio.run_coroutine_threadsafe(self._set_health(NOT_SERVING), loop)

        try:
            backend = await asyncio.to_thread(self.loader, self.metrics, on_failure)
        except Exception as e:  # noqa: BLE001 - a model that cannot load leaves the server NOT_SERVING
            log.exception("model failed to load")
            self.state.load_error = f"{type(e).__name__}: {e}"
            return
        finally:
            self.loaded.set()
        if self.state.stopping:
            backend.loop.stop()
            return
        self.state.backend = backend
        await self._set_health(SERVING)
        log.info("model %s loaded; serving", backend.info.model_name)

    async def stop(self, grace: float = 5.0) -> None:
        """Refuse new requests, let streams finish for up to `grace` seconds, then abort the rest.

        Bounded: returns about `grace` + `STOP_MARGIN_S` seconds after it was called, whatever
        streams are open (a Health/Watch stream never ends by itself; it is cancelled then)."""
        self.state.stopping = True
        await self.health.enter_graceful_shutdown()  # Watch streams see NOT_SERVING
        stopping = asyncio.create_task(self._server.stop(grace + STOP_MARGIN_S)) if self._server else None
        try:
            await asyncio.wait_for(self.state.idle.wait(), grace)
        except asyncio.TimeoutError:
            pass
        if self.state.backend is not None:  # aborts what is still running; its streams end at once
            await asyncio.to_thread(self.state.backend.loop.stop, STOP_MARGIN_S)
        if self._server is not None:
            await self._server.stop(0)  # cancels what is left, Health/Watch streams included
        if stopping is not None:
            await stopping
        if self._http is not None:
            await self._http.stop(STOP_MARGIN_S)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()  # type: ignore[attr-defined]
            self._metrics_http.server_close()  # type: ignore[attr-defined]


async def serve(
    listen: Listen,
    loader: Loader,
    grace: float = 5.0,
    on_listening: Callable[[InferenceServer], None] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    server = InferenceServer(listen, loader)
    await server.start()
    if on_listening is not None:
        on_listening(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received; stopping (grace %.1fs)", grace)
    await server.stop(grace)


class BackgroundServer:
    """An InferenceServer on its own thread and event loop; `with BackgroundServer(...) as s: s.port`."""

    def __init__(
        self,
        loader: Loader,
        host: str = "127.0.0.1",
        metrics: bool = True,
        grace: float = 2.0,
        http: HTTPOptions | None = None,
    ):
        self.listen = Listen(host, 0, 0 if metrics else None, http=http)
        self.loader = loader
        self.grace = grace
        self.loop = asyncio.new_event_loop()
        self.server: InferenceServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="moeserve-grpc", daemon=True)

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"{self.listen.host}:{self.server.port}"

    def _call(self, coro: object, timeout: float | None = 60.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def start(self, wait_loaded: bool = True, timeout: float = 300.0) -> BackgroundServer:
        self._thread.start()

        async def start() -> InferenceServer:
            server = InferenceServer(self.listen, self.loader)
            await server.start()
            return server

        self.server = self._call(start())  # type: ignore[assignment]
        if wait_loaded:
            assert self.server is not None
            self._call(self.server.loaded.wait(), timeout)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self._call(self.server.stop(self.grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
