"""The serving program of one rank of an expert-parallel model instance, whoever hosts it.

`ServingRankSpec` is what every rank of one instance gets. `AttentionRank` joins the world, loads
the attention side, and runs an `Engine` over a `LocalModelRunner` whose routed experts are the
`AllToAllExecutor`, driven by a `LockstepLoop`; its `submit`/`abort` take the front end's request
keys and its outputs go to one callback as `(key, RequestOutput)`. `run_expert_rank` joins the
world, loads this rank's experts and serves until the world stops. Local processes
(`server.ep_frontend`) and Ray actors (`serve_ranks`) wrap these; this module starts nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moeserve.engine_settings import EngineSettings
from moeserve.workers.engine.core import Engine, EngineObserver
from moeserve.workers.engine.loop import EngineStopped, QueueFull
from moeserve.workers.engine.observe import RankGauges
from moeserve.workers.engine.prefix_cache import model_cache_salt
from moeserve.workers.engine.request import AbortCause, InvalidRequest, RequestOutput, SamplingParams
from moeserve.workers.engine.runner import LocalModelRunner
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.dtype_policy import resolve_dtype
from moeserve.workers.model.loader import load_attention_side, load_experts
from moeserve.workers.model.mtp import load_mtp, load_mtp_experts
from moeserve.workers.model.tokenizer import Tokenizer
from moeserve.workers.parallel.dispatch import AllToAllExecutor, ExpertServer, LockstepPasses
from moeserve.workers.parallel.rebalance import ExpertBalancer
from moeserve.workers.parallel.settings import EPSettings, served_moe_layers
from moeserve.workers.parallel.world import EPWorld, init_world
from moeserve.workers.ranks.lockstep import LockstepLoop, serve_experts

log = logging.getLogger(__name__)

# (front-end key, output) from an attention rank's engine thread
OutputCallback = Callable[[int, RequestOutput], None]


@dataclass(frozen=True)
class ServingRankSpec:
    """Everything a rank of one serving instance needs; every rank gets the same copy."""

    model_path: Path
    ep: EPSettings
    engine: EngineSettings
    threads: int = 1
    """torch CPU threads per rank."""
    auto_dtype: bool = False
    """`dtype auto`: `ep.dtype` is provisional until `for_this_host` picks it on the host of
    attention rank 0, before any rank loads (every rank then gets the same choice)."""

    def for_this_host(self) -> ServingRankSpec:
        """This spec with an `auto` dtype decided for this host's device (`dtype_policy`), logged."""
        if not self.auto_dtype:
            return self
        device = torch.device("cuda" if self.ep.backend == "nccl" else "cpu")
        choice = resolve_dtype("auto", self.model_path, device)
        log.info("%s", choice.describe())
        return replace(self, ep=replace(self.ep, dtype=choice.compute), auto_dtype=False)

    @property
    def drafts_with_mtp(self) -> bool:
        """`--speculative mtp`: attention ranks hold the MTP layer, expert ranks its routed experts."""
        return self.engine.speculative == "mtp"

    def moe_calls_per_step(self, config: ModelConfig) -> list[int]:
        """The routed layer of each MoE call of one step, in the order every rank makes them: the
        model's MoE layers once each, then the MTP layer once per draft token (its first pass over
        the step's new tokens, then one per further draft)."""
        layers = served_moe_layers(config, self.drafts_with_mtp)
        mtp = config.num_hidden_layers
        return [layer for layer in layers if layer != mtp] + [
            mtp for _ in range(self.engine.num_speculative_tokens) if mtp in layers
        ]


def join_world(spec: ServingRankSpec, rank: int, store_host: str, store_port: int, secret: bytes) -> EPWorld:
    """Join the instance's world through its launcher's store; `secret` is that instance's."""
    torch.set_num_threads(spec.threads)
    ep = spec.ep
    return init_world(
        rank,
        ep.layout,
        store_host,
        store_port,
        secret,
        ep.backend,
        ep.collective_timeout_s,
        ep.startup_timeout_s,
    )


class AttentionRank:
    """One attention rank's engine behind key-based submit/abort; call `start` once every rank loads."""

    def __init__(
        self,
        spec: ServingRankSpec,
        world: EPWorld,
        on_output: OutputCallback,
        observer: EngineObserver | None = None,
    ):
        config = ModelConfig.from_file(spec.model_path)
        model = load_attention_side(
            spec.model_path, spec.ep.dtype, device=world.device, fp8_weights=spec.ep.fp8_weights
        )
        mtp = None
        if spec.drafts_with_mtp:  # the draft layer beside the model; its experts are on the expert ranks
            mtp = load_mtp(spec.model_path, model, with_routed_experts=False, device=world.device)
        placement = spec.ep.expert_placement(config)
        balance = spec.ep.balance_settings(config, with_mtp=spec.drafts_with_mtp)
        self.balancer = ExpertBalancer(world, placement, balance)
        self.routed = LockstepPasses(
            AllToAllExecutor(world, placement, balancer=self.balancer),
            spec.moe_calls_per_step(config),
            config.hidden_size,
            config.num_experts_per_tok,
        )
        self.runner = LocalModelRunner(
            model, spec.engine.num_blocks, spec.engine.block_size, self.routed, world.device, mtp
        )
        tokenizer = Tokenizer.from_model_dir(spec.model_path)
        salt = model_cache_salt(spec.model_path, str(spec.ep.dtype))
        self.engine = Engine(
            self.runner, spec.engine, config.eos_token_ids, tokenizer, observer, cache_salt=salt
        )
        self.world = world
        self.loop = LockstepLoop(self.engine, world, after_step=self.routed.finish_step)
        self.on_output = on_output
        self._keys: dict[int, int] = {}  # front-end key -> engine key
        self._lock = threading.Lock()

    def start(self) -> None:
        self.world.wait_for_all_ranks()
        self.loop.start()

    def submit(
        self,
        key: int,
        prompt_ids: list[int],
        sampling: SamplingParams,
        request_id: str,
        timeout_s: float | None,
    ) -> None:
        """Queue a request; any refusal comes back as its one (aborted) output, never raised."""

        def sink(out: RequestOutput) -> None:
            if out.finished:
                with self._lock:
                    self._keys.pop(key, None)
            self.on_output(key, out)

        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        try:
            engine_key = self.loop.submit(prompt_ids, sampling, sink, request_id, deadline)
        except Exception as e:  # noqa: BLE001 - every refusal ends the stream, with its own cause
            refused = RequestOutput(request_id, [], "", "abort", abort_cause=refusal_cause(e), error=str(e))
            self.on_output(key, refused)
            return
        with self._lock:
            self._keys[key] = engine_key

    def abort(self, key: int) -> None:
        with self._lock:
            engine_key = self._keys.get(key)
        if engine_key is not None:
            self.loop.abort(engine_key)

    def stats(self) -> dict[str, int]:
        """Counters read off the engine thread (approximate while it steps)."""
        return {
            "kv_blocks_used": self.runner.allocator.num_used,
            "requests": len(self.engine.requests),
            "steps": self.loop.steps,
            "prefix_queried_tokens": self.engine.scheduler.prefix.queried_tokens,
            "prefix_hit_tokens": self.engine.scheduler.prefix.hit_tokens,
        }

    def gauges(self) -> RankGauges:
        """The engine's gauges and per-expert token counts (read off the engine thread)."""
        allocator = self.runner.allocator
        return RankGauges(
            running=len(self.engine.scheduler.running),
            waiting=self.loop.num_waiting,
            kv_blocks_used=allocator.num_used,
            kv_blocks_free=allocator.num_free,
            expert_tokens=self.runner.expert_load.snapshot(),
            expert_rank_tokens=list(self.balancer.state.rank_tokens),
            rebalances=self.balancer.state.rebalances,
            expert_map={layer: [list(ids) for ids in m.ranks] for layer, m in self.balancer.maps.items()},
            rank=self.world.rank,
            kv_blocks_cached=allocator.num_cached,
            prefix_queried_tokens=self.engine.scheduler.prefix.queried_tokens,
            prefix_hit_tokens=self.engine.scheduler.prefix.hit_tokens,
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        self.loop.stop(timeout_s)
        if dist.is_initialized():
            dist.destroy_process_group()

    def expert_map(self) -> dict[str, Any]:
        """Every MoE layer's expert map and balance (`ExpertBalancer.report`; every rank agrees)."""
        return self.balancer.report()

    def request_rebalance(self, timeout_s: float) -> dict[str, Any]:
        """One rebalance check on every rank of the instance at its next step; the maps after it,
        with `changed`: whether a map changed since the request. Blocks the calling thread (never
        the engine's) until the check ran: TimeoutError after `timeout_s`, EngineStopped if the
        loop ends first."""
        before = self.balancer.state.rebalances
        ticket = self.balancer.request()
        deadline = time.monotonic() + timeout_s
        while self.balancer.state.answered < ticket:
            if not self.loop.alive:
                raise EngineStopped(f"{self.world.name}: the engine stopped before the rebalance check ran")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.world.name}: no rebalance check within {timeout_s:g} s")
            time.sleep(0.01)  # a check takes a step's time or more; polling is cheap next to it
        report = self.balancer.report()
        return {**report, "changed": report["rebalances"] > before}


def refusal_cause(error: Exception) -> AbortCause:
    """How a refused submission ends its stream: only a failed engine means the instance is down."""
    if isinstance(error, QueueFull):
        return "queue_full"
    if isinstance(error, InvalidRequest):
        return "invalid"
    if isinstance(error, EngineStopped):
        return "stopping"
    return "failed"


def run_expert_rank(spec: ServingRankSpec, world: EPWorld, stop: threading.Event | None = None) -> int:
    """Load this expert rank's experts, wait for every rank, serve until the world stops."""
    config = ModelConfig.from_file(spec.model_path)
    placement = spec.ep.expert_placement(config)
    ids = placement.ranks[world.layout.expert_index(world.rank)]
    experts = load_experts(
        spec.model_path, ids, spec.ep.dtype, device=world.device, fp8_weights=spec.ep.fp8_weights
    )
    if spec.drafts_with_mtp:
        experts |= load_mtp_experts(spec.model_path, list(ids), spec.ep.dtype, device=world.device)
    calls = spec.moe_calls_per_step(config)
    passes = {layer: calls.count(layer) for layer in set(calls) if calls.count(layer) > 1}
    weights = sum(p.numel() * p.element_size() for m in experts.values() for p in m.parameters())
    log.info(
        "%s: %d expert slots, %.1f MiB of expert weights; %s",
        world.name,
        len(ids),
        weights / 2**20,
        placement.describe(),
    )
    balance = spec.ep.balance_settings(config, with_mtp=spec.drafts_with_mtp)
    balancer = ExpertBalancer(world, placement, balance, experts)
    world.wait_for_all_ranks()
    server = ExpertServer(world, experts, config.num_experts_per_tok, balancer=balancer, passes=passes)
    steps = serve_experts(server, stop)
    dist.destroy_process_group()
    return steps
