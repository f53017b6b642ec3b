"""Ray side of one model instance: rank actors in a placement group, routing, rebuild on failure.

`AttentionRankActor` and `ExpertRankActor` host the `ep_serving` rank programs (the same lockstep
loops as local processes); attention actors stream `RequestOutput`s with Ray streaming generators.
`RankWorld` is one generation of an instance: a placement group (one bundle per rank; the custom
resources `moeserve_attention` / `moeserve_expert` only when the cluster offers them), A + E actors,
the TCPStore on attention rank 0's node (bound to that node's IP only, closed once every rank joined;
the ranks prove to each other that they hold a secret each generation makes and hands to its actors
through Ray).
`ModelInstanceCore` owns the current world, sends each request to the attention rank with the fewest
in flight, and when any actor dies or a rank fails it ends the streams in flight as "unavailable",
kills the world and starts a fresh one. This module imports ray; the model code does not.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import ray
import torch.distributed as dist
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moeserve import contract
from moeserve.workers.engine.observe import EventRecorder
from moeserve.workers.engine.request import RequestOutput, SamplingParams
from moeserve.workers.parallel.world import host_store, new_secret
from moeserve.workers.ranks.serving import AttentionRank, ServingRankSpec, join_world, run_expert_rank
from moeserve.workers.ray_app.metrics import RankMetrics

log = logging.getLogger(__name__)
METRICS_REFRESH_S = 0.5
ACTOR_PREFIX = "moeserve-rank"  # actor names: f"{ACTOR_PREFIX}-{instance}-{generation}-{role}-{rank}"


@ray.remote(max_concurrency=1000)  # type: ignore[call-overload]
class AttentionRankActor:
    """One attention rank. Async: `generate` streams while the engine thread steps."""

    def __init__(self, spec: ServingRankSpec, rank: int, instance: str):
        self.spec = spec
        self.rank = rank
        self.metrics = RankMetrics(instance, rank)
        self.events = EventRecorder()  # the engine thread records; `run` hands them to `metrics`
        self.ranker: AttentionRank | None = None
        self._queues: dict[int, asyncio.Queue[RequestOutput]] = {}
        self._store: dist.TCPStore | None = None

    async def host_store(self) -> tuple[str, int]:
        """Host the world's rendezvous store here (rank 0), on this node's IP; returns (IP, port)."""
        ip = ray.util.get_node_ip_address()
        self._store = host_store(ip, self.spec.ep.startup_timeout_s)
        return ip, int(self._store.port)

    async def resolve_dtype(self) -> ServingRankSpec:
        """Rank 0 decides an `auto` dtype for its host; the other ranks are made with its answer."""
        self.spec = await asyncio.to_thread(self.spec.for_this_host)
        return self.spec

    async def close_store(self) -> None:
        """Every rank has joined: stop listening for the rendezvous."""
        self._store = None

    async def run(self, host: str, port: int, secret: bytes) -> None:
        """Join, load, wait for every rank, serve; returns when the loop ends, raises if it failed."""
        loop = asyncio.get_running_loop()

        def on_output(key: int, out: RequestOutput) -> None:  # engine thread
            queue = self._queues.get(key)
            if queue is not None:
                loop.call_soon_threadsafe(queue.put_nowait, out)

        def start() -> AttentionRank:
            world = join_world(self.spec, self.rank, host, port, secret)
            ranker = AttentionRank(self.spec, world, on_output, self.events)
            ranker.start()
            return ranker

        ranker: AttentionRank = await asyncio.to_thread(start)
        self.ranker = ranker
        refreshed = 0.0
        while ranker.loop.alive:  # checked often: a failed loop must end `run` (the supervisor waits on it)
            if time.monotonic() - refreshed >= METRICS_REFRESH_S:
                self.metrics.record(self.events.drain(), ranker.gauges())
                refreshed = time.monotonic()
            await asyncio.sleep(0.1)
        if ranker.loop.failure is not None:
            raise RuntimeError(f"{ranker.world.name} failed: {ranker.loop.failure!r}")

    async def ready(self) -> bool:
        return self.ranker is not None and self.ranker.loop.alive

    async def generate(
        self,
        key: int,
        prompt_ids: list[int],
        sampling: SamplingParams,
        request_id: str,
        timeout_s: float | None,
    ) -> AsyncIterator[RequestOutput]:
        assert self.ranker is not None, "rank is not running"
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[key] = queue
        finished = False
        try:
            self.ranker.submit(key, prompt_ids, sampling, request_id, timeout_s)
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._queues.pop(key, None)
            if not finished:
                self.ranker.abort(key)

    async def abort(self, key: int) -> None:
        if self.ranker is not None:
            self.ranker.abort(key)

    async def stats(self) -> dict[str, int]:
        return self.ranker.stats() if self.ranker is not None else {}

    async def expert_map(self) -> dict[str, Any]:
        assert self.ranker is not None, "rank is not running"
        return self.ranker.expert_map()

    async def request_rebalance(self, timeout_s: float) -> dict[str, Any]:
        """One rebalance check on every rank of this world (waits on a thread, not on this loop)."""
        assert self.ranker is not None, "rank is not running"
        return await asyncio.to_thread(self.ranker.request_rebalance, timeout_s)


@ray.remote
class ExpertRankActor:
    """One expert rank: serves every MoE layer's dispatches until the world stops."""

    def __init__(self, spec: ServingRankSpec, rank: int):
        self.spec = spec
        self.rank = rank

    def run(self, host: str, port: int, secret: bytes) -> int:
        world = join_world(self.spec, self.rank, host, port, secret)
        return run_expert_rank(self.spec, world)


def bundle_resources(role: str, gpus: float, cluster: dict[str, float]) -> dict[str, float]:
    """One rank's bundle: a CPU, its GPUs, and its role's custom resource if the cluster has it."""
    name = contract.RAY_RESOURCE_ATTENTION if role == "attention" else contract.RAY_RESOURCE_EXPERT
    bundle = {"CPU": 1.0}
    if gpus:
        bundle["GPU"] = gpus
    if cluster.get(name, 0) > 0:
        bundle[name] = 1.0
    return bundle


class RankWorld:
    """One generation of a model instance's ranks as Ray actors in one placement group."""

    def __init__(
        self, spec: ServingRankSpec, instance: str, generation: int, gpus: tuple[float, float] = (0.0, 0.0)
    ):
        name = f"{ACTOR_PREFIX}-{instance}-{generation}"
        layout = spec.ep.layout
        cluster = ray.cluster_resources()
        bundles = [
            bundle_resources(layout.role(r), gpus[0] if layout.role(r) == "attention" else gpus[1], cluster)
            for r in range(layout.size)
        ]
        self.layout = layout
        self.pg: PlacementGroup = placement_group(bundles, strategy="PACK", name=f"{name}-pg")
        self.attention: list[Any] = []
        self.experts: list[Any] = []
        self.runs: list[ray.ObjectRef] = []
        self.name = name
        self.instance = instance
        self._spec = spec

    def actor_name(self, rank: int) -> str:
        return f"{self.name}-{self.layout.role(rank)}-{rank}"

    async def start(self, timeout_s: float) -> None:
        await asyncio.wait_for(self.pg.ready(), timeout_s)
        spec = self._spec
        for rank in range(self.layout.size):
            role = self.layout.role(rank)
            options: Any = {
                "name": self.actor_name(rank),
                "num_cpus": 1,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=rank
                ),
            }
            attention: Any = AttentionRankActor  # ray.remote classes: mypy does not see `options`
            expert: Any = ExpertRankActor
            if role == "attention":
                actor = attention.options(**options).remote(spec, rank, self.instance)
            else:
                actor = expert.options(**options).remote(spec, rank)
            (self.attention if role == "attention" else self.experts).append(actor)
            if rank == 0 and spec.auto_dtype:
                spec = await actor.resolve_dtype.remote()
        host, port = await self.attention[0].host_store.remote()
        secret = new_secret()  # this generation's; reaches its actors only, through Ray
        self.runs = [a.run.remote(host, port, secret) for a in [*self.attention, *self.experts]]
        deadline = time.monotonic() + timeout_s
        for actor in self.attention:
            while not await actor.ready.remote():
                done, _ = ray.wait(self.runs, timeout=0)
                if done:
                    await done[0]  # raises the failure
                    raise RuntimeError("a rank ended while starting")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: ranks not ready after {timeout_s:g} s")
                await asyncio.sleep(0.1)
        await self.attention[0].close_store.remote()

    def failed_rank(self) -> str | None:
        """A description of a rank whose actor ended (it should run until the world stops), or None."""
        done, _ = ray.wait(self.runs, timeout=0) if self.runs else ([], [])
        if not done:
            return None
        rank = self.runs.index(done[0])
        try:
            ray.get(done[0])
            return f"{self.layout.describe(rank)} stopped"
        except Exception as e:  # noqa: BLE001 - described, then the world is rebuilt
            return f"{self.layout.describe(rank)}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"

    def kill(self) -> None:
        for actor in [*self.attention, *self.experts]:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.pg)


class ModelInstanceCore:
    """One model instance (a Serve replica's payload): its current `RankWorld`, routing, recovery."""

    def __init__(self, spec: ServingRankSpec, name: str, gpus: tuple[float, float] = (0.0, 0.0)):
        self.spec = spec
        self.name = name
        self.gpus = gpus
        self.world: RankWorld | None = None
        self.generation = 0
        self.ready = asyncio.Event()
        self._keys = itertools.count()
        self._load: list[int] = []
        self._lock = threading.Lock()
        self._supervisor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._build()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _build(self) -> None:
        while True:
            self.generation += 1
            world = RankWorld(self.spec, self.name, self.generation, self.gpus)
            try:
                await world.start(self.spec.ep.startup_timeout_s)
            except Exception:  # noqa: BLE001 - logged; a fresh world is tried
                log.exception("%s: world %d failed to start; retrying", self.name, self.generation)
                world.kill()
                await asyncio.sleep(1.0)
                continue
            self.world, self._load = world, [0] * self.spec.ep.attention_ranks
            self.ready.set()
            log.info("%s: world %d serving", self.name, self.generation)
            return

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            world = self.world
            problem = world.failed_rank() if world is not None else None
            if world is not None and problem is not None:
                await self.recover(world, problem)

    async def recover(self, world: RankWorld, problem: str) -> None:
        """Replace `world` (if still current): kill its actors (ending its streams), start fresh ones."""
        if self.world is not world:
            return
        log.error("%s: %s; rebuilding the model instance", self.name, problem)
        self.ready.clear()
        self.world = None
        world.kill()
        await self._build()

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, request_id: str, timeout_s: float | None
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request from the least-loaded attention rank; a lost rank ends it "unavailable"."""
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s or self.spec.ep.startup_timeout_s)
        except asyncio.TimeoutError:
            yield _unavailable(request_id, f"{self.name} is rebuilding its ranks")
            return
        world = self.world
        assert world is not None
        rank = min(range(len(self._load)), key=lambda r: self._load[r])
        self._load[rank] += 1
        key = next(self._keys)
        stream = (
            world.attention[rank]
            .generate.options(num_returns="streaming")
            .remote(key, prompt_ids, sampling, request_id, timeout_s)
        )
        finished = False
        try:
            async for ref in stream:
                out: RequestOutput = await ref
                if out.abort_cause == "failed":  # a rank failed: the instance rebuilds; retry later
                    out = replace(out, abort_cause="unavailable")
                finished = out.finished
                yield out
        except ray.exceptions.RayError as e:
            finished = True
            yield _unavailable(request_id, f"{self.name}: a rank was lost: {type(e).__name__}")
        finally:
            if self.world is world:
                self._load[rank] -= 1
            if not finished:
                world.attention[rank].abort.remote(key)

    def control(self) -> tuple[str, str] | None:
        """(name, namespace) of attention rank 0's actor while the world serves (the admin routes
        reach the ranks there), else None. A name, not the handle: a handle in every readiness
        report slowed the reports by seconds."""
        world = self.world
        if world is None or not self.ready.is_set():
            return None
        return world.actor_name(0), ray.get_runtime_context().namespace

    async def stats(self) -> list[dict[str, int]]:
        world = self.world
        return [await a.stats.remote() for a in world.attention] if world is not None else []

    def shutdown(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self.world is not None:
            self.world.kill()
            self.world = None


def _unavailable(request_id: str, error: str) -> RequestOutput:
    return RequestOutput(request_id, [], "", "abort", abort_cause="unavailable", error=error)
