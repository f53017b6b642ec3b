"""Online expert rebalancing: every rank switches to a new placement between two steps, in lockstep.

`ExpertBalancer` is one rank's `BetweenSteps` action (`EPWorld.control` runs it on every rank in
the same iteration). Attention ranks count the routed tokens of each MoE layer since the last
rebalance (`record`); when it is due (every `interval` steps, or `request`ed), every rank:
1. sums those counts over the world (all-reduce [L, n]; expert ranks add zeros), so every rank
   holds the same window;
2. computes each layer's EPLB map (`eplb.balanced_placement`, deterministic: the same map on every
   rank) and keeps it only where it lowers that layer's predicted max/mean by `min_gain`;
3. copies the expert weights a rank newly hosts from a rank that hosted them (one all-to-all of raw
   bytes over the world; attention ranks send and receive nothing), builds that rank's new
   `RoutedExperts` and swaps them in; attention ranks swap their dispatch `Routes`.
No step runs meanwhile, so no request sees a half-moved map, and outputs do not change: an
expert's weights are the same wherever it runs. Maps are per MoE layer from the first rebalance on.
This module knows nothing about engines or requests; it is driven by `EPWorld.control`.
Legend: L MoE layers, n experts, E expert ranks, N world size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moeserve.workers.model.huge_pages import allocate_on_huge_pages
from moeserve.workers.model.moe import RoutedExperts
from moeserve.workers.parallel.eplb import balanced_placement, imbalance, rank_loads
from moeserve.workers.parallel.placement import ExpertPlacement, Routes
from moeserve.workers.parallel.world import EPWorld, StepControl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BalanceSettings:
    """When and how an instance rebalances; every rank gets the same copy (`EPSettings.balance_settings`)."""

    interval: int = 0
    """Steps between rebalances (0: only when requested)."""
    min_gain: float = 0.05
    """Least relative drop of a layer's predicted max/mean rank load for its new map to be taken."""
    num_groups: int = 1
    """Expert groups of group-limited routing (1: plain top-k)."""
    num_nodes: int = 1
    """Nodes the expert ranks span; > 1: groups are kept within nodes (hierarchical EPLB)."""
    moe_layers: Sequence[int] = ()
    """The model's MoE layer indices (every rank must agree on them)."""


@dataclass
class BalanceState:
    """What a balancer has seen, for metrics and logs (read from other threads; replaced whole)."""

    rebalances: int = 0
    """Rebalances that changed at least one layer's map."""
    checks: int = 0
    """Rebalance checks run (changed or not)."""
    rank_tokens: list[int] = field(default_factory=list)
    """Routed (token, expert rank) rows this attention rank sent to each expert rank in the last step."""
    imbalance: dict[int, float] = field(default_factory=dict)
    """Layer -> predicted max/mean rank load of its current map over the last window."""
    imbalance_before: dict[int, float] = field(default_factory=dict)
    """The same for the map each layer had before the last check."""
    seconds: float = 0.0
    """How long the last rebalance check took on this rank (maps, weight copies, switch)."""
    answered: int = 0
    """The last `request` ticket a check has answered (every request up to it ran after its ask)."""


class ExpertBalancer:
    """One rank's part of online rebalancing; `experts` is the rank's routed experts (expert ranks)
    or None (attention ranks). Install it with the executor or server that routes through it."""

    def __init__(
        self,
        world: EPWorld,
        placement: ExpertPlacement,
        settings: BalanceSettings,
        experts: dict[int, RoutedExperts] | None = None,
    ):
        self.world = world
        self.settings = settings
        self.layers = sorted(settings.moe_layers)
        self.maps: dict[int, ExpertPlacement] = {layer: placement for layer in self.layers}
        shared = Routes(placement, world.device)
        self.routes: dict[int, Routes] = {layer: shared for layer in self.layers}
        self.experts = experts  # replaced in place: the ExpertServer holds the same dict
        self.state = BalanceState()
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self._window = torch.zeros(len(self.layers), placement.num_experts, dtype=torch.long)  # [L, n]
        self._step_rows = [0] * placement.num_ranks
        self._steps = 0
        self._requested = threading.Event()
        self._tickets = 0  # requests asked so far; a check answers every one asked before it starts
        self._lock = threading.Lock()

    # attention ranks, while routing
    def record(self, layer: int, ids: torch.Tensor, rows_per_rank: torch.Tensor) -> None:
        """ids [T, K] global expert ids routed in `layer`; rows_per_rank [E] rows sent to each rank."""
        counts = torch.bincount(ids.flatten().cpu(), minlength=self._window.shape[1])  # [n]
        with self._lock:
            self._window[self._row[layer]] += counts
        for r, rows in enumerate(rows_per_rank.tolist()):
            self._step_rows[r] += rows

    def request(self) -> int:
        """Ask for a rebalance check at the next step (any rank's request makes every rank run it).

        Returns a ticket: the check has run for it once `state.answered >= ticket`."""
        with self._lock:
            self._tickets += 1
            self._requested.set()
            return self._tickets

    def report(self) -> dict[str, Any]:
        """The current map and balance of every MoE layer, JSON-ready (the admin endpoints; any thread).

        `imbalance` is the predicted max/mean rank load of the layer's map over the window of the
        last check, `imbalance_before` that of the map it had before that check (None before any)."""
        state = self.state
        layers = [
            {
                "layer": layer,
                "ranks": [list(ids) for ids in self.maps[layer].ranks],
                "imbalance": state.imbalance.get(layer),
                "imbalance_before": state.imbalance_before.get(layer),
            }
            for layer in self.layers
        ]
        return {
            "rebalances": state.rebalances,
            "checks": state.checks,
            "last_check_seconds": state.seconds,
            "interval": self.settings.interval,
            "min_gain": self.settings.min_gain,
            "layers": layers,
        }

    # BetweenSteps
    def wanted(self) -> bool:
        every = self.settings.interval
        return self._requested.is_set() or (every > 0 and self._steps >= every)

    def observe(self, agreed: StepControl) -> None:
        if agreed.work:
            self._steps += 1
            self.state = _replace(self.state, rank_tokens=self._step_rows)
            self._step_rows = [0] * len(self._step_rows)

    def run(self) -> None:
        """Every rank, in lockstep: sum the window, compute the maps, move the weights, switch."""
        self._steps = 0
        world, t0 = self.world, time.perf_counter()
        with self._lock:  # with the clear: a request asked from here on gets the next check
            self._requested.clear()
            answers = self._tickets
            window = self._window.clone()
            self._window.zero_()
        window = window.to(world.device)
        what = "expert load of the rebalance"
        work = torch.distributed.all_reduce(window, group=world.group, async_op=True)  # [L, n] SUM
        assert work is not None
        world.wait([work], what)
        counts = window.cpu().tolist()
        changed: dict[int, ExpertPlacement] = {}
        imbalances: dict[int, float] = {}
        previous: dict[int, float] = {}
        for layer, load in zip(self.layers, counts, strict=True):
            old = self.maps[layer]
            before = imbalance(old, load)
            imbalances[layer] = previous[layer] = before
            if not sum(load):
                continue
            new = balanced_placement(
                load, old.num_ranks, old.redundant, self.settings.num_groups, self.settings.num_nodes
            )
            after = imbalance(new, load)
            if new != old and after <= before * (1 - self.settings.min_gain):
                changed[layer] = new
                imbalances[layer] = after
        if changed:
            self._move_weights(changed)
            for layer, new in changed.items():
                self.maps[layer] = new
                self.routes[layer] = Routes(new, world.device)
        self.state = _replace(
            self.state,
            rebalances=self.state.rebalances + bool(changed),
            checks=self.state.checks + 1,
            imbalance=imbalances,
            imbalance_before=previous,
            seconds=time.perf_counter() - t0,
            answered=answers,
        )
        if changed and world.rank == 0:
            for layer, new in sorted(changed.items()):
                loads = [round(x) for x in rank_loads(new, counts[self._row[layer]])]
                log.info("expert map of MoE layer %d: %s; window rank loads %s", layer, new.describe(), loads)

    def _move_weights(self, changed: dict[int, ExpertPlacement]) -> None:
        """One all-to-all of raw bytes carries every expert a rank newly hosts from an old host."""
        world, a = self.world, self.world.layout.attention_ranks
        # (layer, expert, source expert rank, destination expert rank), the same list on every rank
        plan: list[tuple[int, int, int, int]] = []
        for layer in sorted(changed):
            old, new = self.maps[layer], changed[layer]
            hosts = old.replicas()
            for dst, ids in enumerate(new.ranks):
                for e in sorted(set(ids) - set(old.ranks[dst])):
                    plan.append((layer, e, hosts[e][dst % len(hosts[e])], dst))
        size = world.layout.size
        send_splits, recv_splits = [0] * size, [0] * size
        chunks: list[torch.Tensor] = []
        me = world.layout.expert_index(world.rank) if world.role == "expert" else -1
        per_expert = _expert_bytes(self.experts) if self.experts is not None else 0
        for layer, e, src, dst in sorted(plan, key=lambda p: (p[3], p[0], p[1])):  # by destination
            if src == me:
                send_splits[a + dst] += per_expert
                chunks.append(_expert_as_bytes(self._local(layer), e))
        for _, _, src, dst in plan:
            if dst == me:
                recv_splits[a + src] += per_expert
        send = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=world.device)
        recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=world.device)
        what = "expert weights of the rebalance"
        world.wait([world.all_to_all(recv, send, recv_splits, send_splits, what)], what)  # bytes
        if self.experts is None:
            return
        offsets = [sum(recv_splits[:s]) for s in range(size)]  # where each source's bytes start
        arrived: dict[tuple[int, int], torch.Tensor] = {}
        for layer, e, src, dst in sorted(plan, key=lambda p: (p[3], p[0], p[1])):
            if dst == me:
                start = offsets[a + src]
                arrived[(layer, e)] = recv[start : start + per_expert]
                offsets[a + src] += per_expert
        for layer, new in changed.items():
            self.experts[layer] = _rebuilt(self._local(layer), list(new.ranks[me]), arrived, layer)

    def _local(self, layer: int) -> RoutedExperts:
        assert self.experts is not None
        return self.experts[layer]


def _replace(state: BalanceState, **changes: object) -> BalanceState:
    fields = {**state.__dict__, **changes}
    return BalanceState(**fields)  # type: ignore[arg-type]


def _expert_bytes(experts: dict[int, RoutedExperts]) -> int:
    module = next(iter(experts.values()))
    return sum(p[0].numel() * p.element_size() for p in module.parameters())


def _expert_as_bytes(module: RoutedExperts, expert: int) -> torch.Tensor:
    """Every parameter's slice for one hosted expert as raw bytes, in parameter order."""
    i = module.expert_ids.index(expert)
    return torch.cat([p.detach()[i].contiguous().view(-1).view(torch.uint8) for p in module.parameters()])


def _rebuilt(
    old: RoutedExperts, ids: list[int], arrived: dict[tuple[int, int], torch.Tensor], layer: int
) -> RoutedExperts:
    """The rank's experts `ids` of one layer: kept ones copied from `old`, new ones from `arrived`
    (every parameter, fp8 block scales included, in parameter order)."""
    dim, inter = old.w2.shape[1], old.w2.shape[2]
    new = RoutedExperts(
        dim, inter, ids, dtype=old.dtype, fp8_block=old.fp8_block, weight_dtype=old.weight_dtype
    ).to(old.w2.device)
    allocate_on_huge_pages(new)  # as the loader placed the experts it replaces
    with torch.no_grad():
        for j, e in enumerate(ids):
            if e in old.expert_ids:
                i = old.expert_ids.index(e)
                for p_new, p_old in zip(new.parameters(), old.parameters(), strict=True):
                    p_new[j].copy_(p_old[i])
                continue
            raw, offset = arrived[(layer, e)], 0
            for p_new in new.parameters():
                n = p_new[j].numel() * p_new.element_size()
                p_new[j].copy_(raw[offset : offset + n].view(p_new.dtype).view(p_new[j].shape))
                offset += n
    return new
