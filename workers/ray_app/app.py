"""The Ray Serve application: `build_app(args)` (import path `moeserve.workers.ray_app.app:build_app`).

Three deployments: `InferenceIngress` implements the `moeserve.v1.Inference` RPCs for Ray Serve's
own gRPC proxy (method names are the RPC names; `Generate` is a streaming generator; status codes go
through Serve's `grpc_context`), validating each request against a weight-less twin of the engine;
`ModelInstance` has `config.replicas` replicas, each owning one expert-parallel model instance
(`serve_ranks.ModelInstanceCore`: rank actors in a placement group); `InstanceHealth` (one replica)
collects every instance's readiness so that health checks see all instances, not the one Serve's
router happens to pick. Serve's handle spreads requests over the instances. This module builds and
wires; it holds no model weights itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from moeserve import contract
from moeserve.serve_config import ServeAppConfig, ServeConfigError
from moeserve.v1 import inference_pb2 as pb
from moeserve.workers.engine.request import InvalidRequest, RequestOutput, SamplingParams
from moeserve.workers.engine.validation import validation_engine
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.loader import EMBEDDED_MODEL_PATH
from moeserve.workers.model.tokenizer import Tokenizer
from moeserve.workers.parallel.placement import PlacementError
from moeserve.workers.parallel.settings import EPSettings
from moeserve.workers.ranks.serving import ServingRankSpec
from moeserve.workers.ray_app.openai_ingress import ServeRequestLoop
from moeserve.workers.ray_app.prefix_router import prefix_router_config
from moeserve.workers.ray_app.ranks import ModelInstanceCore
from moeserve.workers.ray_app.routing import READY_STAT, router_config
from moeserve.workers.server.convert import check_sizes, model_info, to_engine, to_response
from moeserve.workers.server.openai_api.chat_template import ChatTemplate
from moeserve.workers.server.openai_api.convert import ApiError
from moeserve.workers.server.openai_api.routes import HTTPOptions, create_app
from moeserve.workers.server.servicer import Backend, ServingState

log = logging.getLogger(__name__)
APP_NAME = contract.SERVE_APP_NAME  # the Serve application `moeserve serve --ray` runs
HEALTH_SERVICE = contract.INFERENCE_SERVICE
HEALTH_SERVICE_AVAILABLE = HEALTH_SERVICE + "/available"
HEARTBEAT_S = 1.0  # an instance re-reports its readiness this often, and at once when it changes
STALE_S = 5.0  # an instance not heard from for this long is gone (its replica died or was removed)
_STATUS = {
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "failed": grpc.StatusCode.INTERNAL,
    "error": grpc.StatusCode.INTERNAL,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "queue_full": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "stopping": grpc.StatusCode.UNAVAILABLE,
}


def model_path(cfg: ServeAppConfig) -> Path:
    return Path(cfg.model.path) if cfg.model.path else EMBEDDED_MODEL_PATH


def rank_spec(cfg: ServeAppConfig) -> ServingRankSpec:
    """What every rank of every instance gets, from the validated config."""
    engine = cfg.engine
    auto = cfg.model.dtype == "auto"
    placement = tuple(tuple(r) for r in cfg.placement) if cfg.placement is not None else None
    ep = EPSettings(
        cfg.attention_ranks,
        cfg.expert_ranks,
        collective_timeout_s=cfg.collective_timeout_s,
        backend="nccl" if cfg.gpus_per_attention_rank > 0 else "gloo",
        # auto: a placeholder until attention rank 0 decides on its host (`RankWorld.start`)
        dtype=torch.float32 if auto else getattr(torch, cfg.model.dtype),
        fp8_weights=cfg.model.fp8_weights,
        placement=placement,
        block_size=engine.block_size,
        redundant_experts=cfg.redundant_experts,
        rebalance_interval=cfg.rebalance_interval,
        rebalance_min_gain=cfg.rebalance_min_gain,
    )
    return ServingRankSpec(model_path(cfg), ep, engine, auto_dtype=auto)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class InstanceHealth:
    """Readiness of every model instance, as each reports it (heartbeats; stale ones expire).

    Its state is rebuilt within one heartbeat if Serve restarts it, so it needs no persistence."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[bool, float]] = {}  # instance -> (ready, when reported)
        self._controls: dict[str, tuple[str, str] | None] = {}  # instance -> its control actor

    async def report(self, instance: str, ready: bool, control: tuple[str, str] | None = None) -> None:
        """`control`: (name, namespace) of the instance's attention rank 0 actor while it serves
        (the admin routes' way to its ranks)."""
        self._seen[instance] = (ready, time.monotonic())
        self._controls[instance] = control

    async def ready_instances(self) -> tuple[int, int]:
        """(instances heard from within `STALE_S`, how many of them are ready)."""
        now = time.monotonic()
        self._seen = {k: v for k, v in self._seen.items() if now - v[1] <= STALE_S}
        return len(self._seen), sum(ready for ready, _ in self._seen.values())

    async def controls(self) -> dict[str, tuple[str, str]]:
        """instance -> (name, namespace) of the attention rank 0 actor of every ready instance
        heard from within `STALE_S`."""
        await self.ready_instances()  # drops the stale
        found = {k: self._controls.get(k) for k, (up, _) in self._seen.items() if up}
        return {k: control for k, control in found.items() if control is not None}


@serve.deployment(
    ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000, request_router_config=router_config()
)
class ModelInstance:
    """One model instance per replica: A attention + E expert rank actors, rebuilt when one dies."""

    async def __init__(self, config: dict[str, Any], health: DeploymentHandle):  # type: ignore[misc]
        cfg = ServeAppConfig.from_dict(config)
        self.name = serve.get_replica_context().replica_id.unique_id
        gpus = (cfg.gpus_per_attention_rank, cfg.gpus_per_expert_rank)
        self.core = ModelInstanceCore(rank_spec(cfg), self.name, gpus)
        self.health = health
        self._reporter = asyncio.create_task(self._report_readiness())  # "not ready" while starting
        await self.core.start()

    async def _report_readiness(self) -> None:
        last: tuple[bool, int, float] | None = None
        while True:
            ready, world = self.core.ready.is_set(), self.core.generation
            # at once on a change (a rebuilt world has a new control actor), else every HEARTBEAT_S
            if last is None or last[:2] != (ready, world) or time.monotonic() - last[2] >= HEARTBEAT_S:
                try:
                    await self.health.report.remote(self.name, ready, self.core.control())
                    last = (ready, world, time.monotonic())
                except Exception:  # noqa: BLE001 - the health deployment restarts; report again
                    log.warning("%s: readiness report failed", self.name, exc_info=True)
            await asyncio.sleep(0.05)

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, request_id: str, timeout_s: float | None
    ) -> AsyncIterator[RequestOutput]:
        async for out in self.core.generate(prompt_ids, sampling, request_id, timeout_s):
            yield out

    async def stats(self) -> list[dict[str, int]]:
        return await self.core.stats()

    async def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve's controller for `ReadyInstancesFirst`."""
        return {READY_STAT: self.core.ready.is_set()}

    def __del__(self) -> None:
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
        core = getattr(self, "core", None)
        if core is not None:
            core.shutdown()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class InferenceIngress:
    """`moeserve.v1.Inference` behind Ray Serve's gRPC proxy, and the OpenAI HTTP API (the
    standalone server's FastAPI app, `openai_ingress`) behind its HTTP proxy."""

    async def __init__(self, model: DeploymentHandle, health: DeploymentHandle, config: dict[str, Any]):  # type: ignore[misc]
        cfg = ServeAppConfig.from_dict(config)
        spec = rank_spec(cfg)
        self.model = model
        self.health = health
        self.instances = cfg.replicas
        self.tokenizer = Tokenizer.from_model_dir(spec.model_path)
        self.engine = validation_engine(spec.model_path, spec.engine, self.tokenizer)
        self.info = model_info(
            spec.model_path.name,
            ModelConfig.from_file(spec.model_path),
            self.engine,
            cfg.model.dtype,
            self.tokenizer is not None,
            cfg.attention_ranks,
            cfg.expert_ranks,
        )
        self.http = HTTPOptions(
            cfg.ports.http,
            cfg.openai.served_model_name or None,
            ChatTemplate.from_model_dir(spec.model_path, override_source=cfg.openai.chat_template),
        )
        self.http_loop = ServeRequestLoop(self.engine, model, health)
        self.metrics_port = cfg.ports.metrics

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The OpenAI API app (Serve calls this once, after `__init__`). Under Ray the engine metrics
        are exported by every node's Ray metrics agent, so `/metrics` here says where they are."""
        state = ServingState(Backend(self.http_loop, self.tokenizer, self.info))  # type: ignore[arg-type]
        state.idle.set()
        app = create_app(state, None, self.http)
        where = f"metrics: under Ray Serve, scrape each node's Ray metrics port :{self.metrics_port}/metrics"

        @app.get("/metrics")
        async def metrics() -> JSONResponse:
            return JSONResponse(ApiError(404, where, None, "not_found").body(), status_code=404)

        return app

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelInfo:
        return self.info

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1.Health/Check over all model instances. "" and `moeserve.v1.Inference`:
        SERVING when every instance is ready, NOT_SERVING while any starts or rebuilds its ranks.
        `moeserve.v1.Inference/available`: SERVING while at least one instance can take requests."""
        if request.service not in ("", HEALTH_SERVICE, HEALTH_SERVICE_AVAILABLE):
            _fail(grpc_context, grpc.StatusCode.NOT_FOUND, f"service: unknown service {request.service!r}")
        _, ready = await self.health.ready_instances.remote()
        needed = 1 if request.service == HEALTH_SERVICE_AVAILABLE else self.instances
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready >= needed
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)

    async def Generate(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:  # sizes first (cheap); tokenizing and the rest off the event loop
            check_sizes(request, self.engine.settings.limits)
            job = await asyncio.to_thread(to_engine, request, self.engine, self.tokenizer)
        except InvalidRequest as e:
            _fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        stream: Any = self.model.options(stream=True).generate.remote(
            job.prompt_ids, job.sampling, request.request_id, None
        )
        first = True
        async for out in stream:  # a DeploymentResponseGenerator
            if out.abort_cause in _STATUS:
                _fail(grpc_context, _STATUS[out.abort_cause], f"{out.abort_cause}: {out.error}")
            yield to_response(out, first)
            first = False


class RPCFailed(RuntimeError):
    """Ends an RPC; the status code and details are already on the gRPC context."""


def _fail(context: RayServegRPCContext, code: grpc.StatusCode, details: str) -> None:
    context.set_code(code)
    context.set_details(details)
    raise RPCFailed(details)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `ServeAppConfig` `args`; a bad config raises `ServeConfigError`, starts nothing."""
    cfg = ServeAppConfig.from_dict(args)  # also insists on >= 1 expert rank
    path = model_path(cfg)
    if not (path / "config.json").exists():
        raise ServeConfigError(f"model.path: no config.json in {path}")
    model_config = ModelConfig.from_file(path)
    try:  # placement errors before any actor starts
        rank_spec(cfg).ep.expert_placement(model_config)
    except PlacementError as e:
        raise ServeConfigError(f"placement: {e}") from e
    if cfg.engine.speculative == "mtp" and model_config.num_nextn_predict_layers < 1:
        raise ServeConfigError(
            f"engine.speculative: mtp needs a checkpoint with an MTP layer; {path} has none "
            "(config.json num_nextn_predict_layers is 0 or absent)"
        )
    config = cfg.to_dict()
    health = InstanceHealth.bind()  # type: ignore[attr-defined]
    # cache-aware routing between instances (issue 17): a prompt goes where its prefix is cached
    router = prefix_router_config(cfg.engine, cfg.attention_ranks)
    model = ModelInstance.options(  # type: ignore[attr-defined]
        num_replicas=cfg.replicas, request_router_config=router
    ).bind(config, health)
    return InferenceIngress.bind(model, health, config)  # type: ignore[attr-defined,no-any-return]


class _Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _raise_stop(*_: object) -> None:
    raise _Stop()


READY_TIMEOUT_S = 600.0  # after serve.run: the proxies answer within a few readiness polls


def wait_until_answering(cfg: ServeAppConfig, host: str, timeout_s: float) -> None:
    """Block until clients get answers through Serve's proxies: the gRPC health check SERVING (every
    instance ready) and, with the HTTP API, `/health` 200 (the ingress's readiness, refreshed every
    `READY_POLL_S`). `serve.run` returns once the deployments are up, which can be before either;
    "serving" is printed only after this. TimeoutError past `timeout_s`."""
    import urllib.error
    import urllib.request

    from moeserve.workers.client import InferenceClient

    deadline = time.monotonic() + timeout_s
    with InferenceClient(f"127.0.0.1:{cfg.ports.grpc}") as client:
        client.wait_serving(timeout_s)
    if not cfg.ports.http:
        return
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{local}:{cfg.ports.http}/health"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # 503 until the ingress has seen a ready instance
        if time.monotonic() > deadline:
            raise TimeoutError(f"the OpenAI HTTP API at {url} did not turn healthy in {timeout_s:g} s")
        time.sleep(0.1)


def run_with_ray(cfg: ServeAppConfig, ray_address: str | None, host: str = "0.0.0.0") -> None:
    """`moeserve serve --ray`: start (or join) Ray, run the app behind Serve's gRPC proxy until
    SIGINT/SIGTERM. Then a Ray it started is shut down with Serve; on a cluster it joined only this
    app is deleted (Serve and the cluster, perhaps shared, keep running)."""
    import os
    import signal
    import threading

    import ray
    from ray.serve.config import gRPCOptions

    app = build_app(cfg.to_dict())  # a bad config fails before Ray starts
    if ray_address:
        ray.init(address=ray_address)
    else:  # logical CPUs: one bundle per rank of every instance, whatever the cores
        ranks = cfg.replicas * (cfg.attention_ranks + cfg.expert_ranks)
        ray.init(
            num_cpus=max(os.cpu_count() or 1, ranks + 1),
            include_dashboard=False,
            _metrics_export_port=cfg.ports.metrics,
        )
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, _raise_stop)
    try:
        grpc_options = gRPCOptions(
            port=cfg.ports.grpc, grpc_servicer_functions=list(contract.SERVE_GRPC_SERVICER_FUNCTIONS)
        )
        # Serve always runs an HTTP proxy; without the HTTP API it listens on a free loopback port.
        http = {"host": host, "port": cfg.ports.http} if cfg.ports.http else {"host": "127.0.0.1", "port": 0}
        serve.start(http_options=http, grpc_options=grpc_options)
        serve.run(app, name=APP_NAME)
        wait_until_answering(cfg, host, READY_TIMEOUT_S)
        metrics = "" if ray_address else f", metrics on :{cfg.ports.metrics}{contract.METRICS_PATH}"
        api = f", OpenAI HTTP API on :{cfg.ports.http}" if cfg.ports.http else ""
        print(
            f"moeserve: serving through Ray Serve's gRPC proxy on :{cfg.ports.grpc}{api}{metrics}",
            flush=True,
        )
        threading.Event().wait()
    except _Stop:
        log.info("signal received; stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if ray_address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
