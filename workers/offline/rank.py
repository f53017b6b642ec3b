"""The program of one rank of an expert-parallel model instance, whatever starts it.

An attention rank loads the attention side (`load_attention_side`) and runs `generate_lockstep`
for its prompts with an `AllToAllExecutor`; an expert rank loads its experts of every MoE layer
(`load_experts`, per the placement) and runs `ExpertServer.serve`. Both run the same list of
`Run`s, so one world can serve several generations in turn. Progress and the outcome go to a
`Reporter` ("ready", "done" with a `RankResult`, or "error" with a message); how processes are
started and supervised is the launcher's business (`offline.local_world`).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.loader import load_attention_side, load_experts
from moeserve.workers.model.moe import MoE
from moeserve.workers.model.transformer import Transformer
from moeserve.workers.offline.generate import GenerationSettings, generate_lockstep
from moeserve.workers.parallel.dispatch import AllToAllExecutor, DispatchStats, ExpertServer
from moeserve.workers.parallel.launch import RankError
from moeserve.workers.parallel.rebalance import ExpertBalancer
from moeserve.workers.parallel.settings import EPSettings
from moeserve.workers.parallel.world import Rendezvous, Role, init_world

# (kind, rank, payload): kind is "ready", "done" (payload RankResult) or "error" (payload RankError)
Reporter = Callable[[str, int, Any], None]


@dataclass(frozen=True)
class Run:
    """One lockstep generation over the whole world."""

    prompts: tuple[list[list[int]], ...]  # per attention rank; a rank may have none
    generation: GenerationSettings = GenerationSettings()
    ping_pong: bool = False
    record_logits: bool = False
    profile: bool = False  # time the routers too; stats cover decode steps only (step 0 is the prefill)
    rebalance: bool = False  # every rank rebalances its experts before this run's first step


@dataclass
class RankResult:
    """What one rank reports when every run is done. Lists are per run."""

    rank: int
    role: Role
    token_ids: list[list[list[int]]] = field(default_factory=list)  # attention: per prompt
    logits: list[list[torch.Tensor]] = field(default_factory=list)  # attention, with record_logits
    stats: list[dict[str, Any]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    step_seconds: list[list[float]] = field(default_factory=list)  # attention ranks
    weight_bytes: int = 0  # parameters this rank holds
    peak_rss_bytes: int = 0


def run_rank(
    rank: int,
    model_path: Path,
    settings: EPSettings,
    runs: list[Run],
    rendezvous: Rendezvous,
    report: Reporter,
) -> RankResult:
    """Join the world, load this rank's weights, run every run. Raises on failure."""
    torch.set_num_threads(1)
    layout = settings.layout
    world = init_world(
        rank,
        layout,
        rendezvous.host,
        rendezvous.port,
        rendezvous.secret,
        settings.backend,
        settings.collective_timeout_s,
        settings.startup_timeout_s,
        on_watchdog=lambda message: report("error", rank, RankError(message, True, time.time())),
    )
    config = ModelConfig.from_file(model_path)
    placement = settings.expert_placement(config)
    balance = settings.balance_settings(config)
    result = RankResult(rank, world.role)
    if world.role == "attention":
        model = load_attention_side(
            model_path, settings.dtype, device=world.device, fp8_weights=settings.fp8_weights
        )
        result.weight_bytes = _param_bytes(model.parameters())
        balancer = ExpertBalancer(world, placement, balance)  # its map carries over from run to run
        world.wait_for_all_ranks()
        report("ready", rank, None)
        for run in runs:
            stats, t0 = DispatchStats(), time.perf_counter()
            hooks = time_routers(model, stats) if run.profile else []
            if run.rebalance:
                balancer.request()
            out = generate_lockstep(
                model,
                run.prompts[rank],
                run.generation,
                AllToAllExecutor(world, placement, stats, balancer),
                world,
                run.ping_pong,
                settings.block_size,
                run.record_logits,
                _reset_after_prefill(stats) if run.profile else None,
            )
            for hook in hooks:
                hook.remove()
            result.seconds.append(time.perf_counter() - t0)
            result.step_seconds.append(out.step_seconds)
            result.token_ids.append(out.token_ids)
            result.logits.append(out.logits)
            result.steps.append(out.steps)
            result.stats.append({**stats.as_dict(), **_balance_stats(balancer)})
    else:
        ids = placement.ranks[layout.expert_index(rank)]
        experts = load_experts(
            model_path, ids, settings.dtype, device=world.device, fp8_weights=settings.fp8_weights
        )
        result.weight_bytes = _param_bytes(p for e in experts.values() for p in e.parameters())
        balancer = ExpertBalancer(world, placement, balance, experts)  # rebalances replace experts' entries
        world.wait_for_all_ranks()
        report("ready", rank, None)
        for run in runs:
            stats, t0 = DispatchStats(), time.perf_counter()
            server = ExpertServer(world, experts, config.num_experts_per_tok, stats, balancer)
            steps = server.serve(_reset_after_prefill(stats) if run.profile else None)
            result.seconds.append(time.perf_counter() - t0)
            result.steps.append(steps)
            result.stats.append(
                {
                    **stats.as_dict(),
                    **_balance_stats(balancer),
                    "expert_ids": {layer: list(m.expert_ids) for layer, m in experts.items()},
                }
            )
    result.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dist.destroy_process_group()
    return result


def time_routers(model: Transformer, stats: DispatchStats) -> list[RemovableHandle]:
    """Add each MoE router's time to stats.seconds["router"] (hooks; remove them when done)."""
    started: list[float] = []

    def before(*_: Any) -> None:
        started.append(time.perf_counter())

    def after(*_: Any) -> None:  # returns None: the router's output stays as it is
        stats.add("router", started.pop())

    hooks: list[RemovableHandle] = []
    for block in model.layers:
        if isinstance(block.ffn, MoE):
            gate = block.ffn.gate
            hooks += [gate.register_forward_pre_hook(before), gate.register_forward_hook(after)]
    return hooks


def _reset_after_prefill(stats: DispatchStats) -> Callable[[int], None]:
    def on_step(step: int) -> None:
        if step == 1:
            stats.reset()

    return on_step


def _balance_stats(balancer: ExpertBalancer) -> dict[str, Any]:
    state = balancer.state
    return {
        "rebalances": state.rebalances,
        "rebalance_s": state.seconds,
        "imbalance": dict(state.imbalance),
        "imbalance_before": dict(state.imbalance_before),
    }


def _param_bytes(params: Any) -> int:
    return sum(p.numel() * p.element_size() for p in params)
