"""Expert-parallel load balancing (after DeepSeek's EPLB): a placement map from measured expert load.

`balanced_placement` takes one MoE layer's per-expert token counts and returns an `ExpertPlacement`
with n + R slots over the expert ranks (slots per rank as even as possible):
1. (hierarchical, when the expert ranks span several nodes and the groups divide among them) pack
   whole expert groups onto nodes, balancing group load, so group-limited routing (a token picks
   from at most `topk_group` groups) keeps a token within at most `topk_group` nodes;
2. replicate: each redundant slot goes to the expert with the heaviest load per replica (a rank
   hosts an expert at most once, so an expert has at most as many replicas as its node has ranks);
3. pack the replicas onto ranks, heaviest first, each onto the least loaded rank that has a free slot
   and does not host that expert yet, then swap replicas off the most loaded rank while that lowers
   it. Replica counts are then searched locally: move one replica to another hot expert and repack,
   while that lowers the most loaded rank.
A replica is assumed to take an equal share of its expert's tokens (the dispatch spreads them by
token index). Bound (checked by the tests): the most loaded rank carries at most the ideal (total /
ranks) plus the heaviest replica's load. Pure Python on small lists: every rank computes the same
map from the same counts. This module moves no weights and knows nothing about processes.
Legend: n experts, R redundant slots, E expert ranks, G groups.
"""

from __future__ import annotations

from collections.abc import Sequence

from moeserve.workers.parallel.placement import ExpertPlacement, PlacementError, check_redundant

Item = tuple[int, float]  # (expert id, load of this replica)


def slot_counts(num_slots: int, num_ranks: int) -> list[int]:
    """Slots per rank, as even as possible (the first ranks take one fewer)."""
    bounds = [r * num_slots // num_ranks for r in range(num_ranks + 1)]
    return [bounds[r + 1] - bounds[r] for r in range(num_ranks)]


def rank_loads(placement: ExpertPlacement, load: Sequence[float]) -> list[float]:
    """Tokens per rank when each expert's tokens split evenly over its replicas."""
    hosts = placement.replicas()
    return [sum(load[e] / len(hosts[e]) for e in ids) for ids in placement.ranks]


def imbalance(placement: ExpertPlacement, load: Sequence[float]) -> float:
    """max / mean of `rank_loads` (1.0 is perfect; 1.0 when there is no load at all)."""
    loads = rank_loads(placement, load)
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def balanced_placement(
    load: Sequence[float],
    num_ranks: int,
    redundant: int = 0,
    num_groups: int = 1,
    num_nodes: int = 1,
) -> ExpertPlacement:
    """A map of len(load) experts + `redundant` slots over `num_ranks` ranks balancing `load`.

    Hierarchical when num_nodes > 1 divides both num_groups and num_ranks (ranks of a node are
    consecutive: node i has ranks [i*E/N, (i+1)*E/N)); otherwise global (groups ignored)."""
    n = len(load)
    if num_ranks < 1 or num_ranks > n:
        raise PlacementError(f"{num_ranks} expert ranks for {n} experts: need 1 to {n}")
    check_redundant(n, num_ranks, redundant)
    if any(w < 0 for w in load):
        raise PlacementError("expert loads must be >= 0")
    slots = slot_counts(n + redundant, num_ranks)
    weights = [float(w) for w in load]
    if num_nodes > 1 and num_groups % num_nodes == 0 and num_ranks % num_nodes == 0 and n % num_groups == 0:
        ranks = _hierarchical(weights, slots, num_groups, num_nodes)
    else:
        ranks = _place(list(range(n)), weights, slots)
    return ExpertPlacement.from_lists(n, ranks, redundant)


def _hierarchical(load: list[float], slots: list[int], num_groups: int, num_nodes: int) -> list[list[int]]:
    n, num_ranks = len(load), len(slots)
    size, per_node = n // num_groups, num_ranks // num_nodes
    group_load = [sum(load[g * size : (g + 1) * size]) for g in range(num_groups)]
    # groups onto nodes: equal group counts, balanced load (the packing below, one slot per group)
    groups_of = _pack(
        [(g, group_load[g]) for g in range(num_groups)], [num_groups // num_nodes] * num_nodes, distinct=False
    )  # item index = group id
    ranks: list[list[int]] = []
    for node in range(num_nodes):
        experts = [e for g in sorted(groups_of[node]) for e in range(g * size, (g + 1) * size)]
        node_slots = slots[node * per_node : (node + 1) * per_node]
        if sum(node_slots) < len(experts) or sum(node_slots) > len(experts) * per_node:
            raise PlacementError(
                f"node {node}: {sum(node_slots)} slots cannot host {len(experts)} experts on {per_node} ranks"
            )
        ranks += _place(experts, load, node_slots)
    return ranks


def _place(experts: list[int], load: list[float], slots: list[int]) -> list[list[int]]:
    """Choose how many replicas each expert gets, pack them onto len(slots) ranks, keep the best."""
    extra, most = sum(slots) - len(experts), len(slots)
    # starts: DeepSeek's greedy (every slot to the heaviest load per replica), and the greedy for
    # fewer slots with the rest on the coldest experts (with few ranks, a hot expert split in two
    # can pack worse than one kept whole)
    starts = [
        _replicate(experts, load, k, extra - k, most) for k in sorted({extra, extra // 2, 0}, reverse=True)
    ]
    best = min((_packed(c, load, slots, improve=False) for c in starts), key=lambda packed: packed[0])
    for _ in range(_ROUNDS):  # local search: move one replica to another expert, repack
        copies = best[1]
        per_replica = sorted(experts, key=lambda e: (load[e] / copies[e], e))
        donors = [a for a in per_replica if copies[a] > 1][:_CANDIDATES]  # least useful replicas
        takers = [b for b in reversed(per_replica) if copies[b] < most][:_CANDIDATES]
        trials = []
        for a in donors:
            for b in takers:
                if b != a:
                    trial = dict(copies)
                    trial[a] -= 1
                    trial[b] += 1
                    trials.append(_packed(trial, load, slots, improve=False))
        better = min(trials, key=lambda packed: packed[0], default=None)
        if better is None or better[0] >= best[0] - 1e-9:
            break
        best = better
    return _packed(best[1], load, slots, improve=True)[2]


_CANDIDATES = 6  # donor and taker experts considered per round of the replica-count search
_ROUNDS = 4  # rounds of that search


def _replicate(experts: list[int], load: list[float], hot: int, cold: int, most: int) -> dict[int, int]:
    """Replica counts: `hot` extra replicas one at a time to the heaviest load per replica, then
    `cold` to the lightest experts; an expert has at most `most` replicas (ties: lowest id)."""
    copies = {e: 1 for e in experts}
    for _ in range(hot):
        e = max((e for e in experts if copies[e] < most), key=lambda e: (load[e] / copies[e], -e))
        copies[e] += 1
    for _ in range(cold):
        e = min((e for e in experts if copies[e] < most), key=lambda e: (load[e] * copies[e], e))
        copies[e] += 1
    return copies


def _packed(
    copies: dict[int, int], load: list[float], slots: list[int], improve: bool
) -> tuple[float, dict[int, int], list[list[int]]]:
    """(most loaded rank, copies, experts per rank) of the replicas `copies` packed onto the ranks
    (with `improve`, also the swap search after the greedy packing)."""
    items = [(e, load[e] / copies[e]) for e in sorted(copies) for _ in range(copies[e])]
    ranks = _pack(items, slots, distinct=True, improve=improve)
    experts = [[items[i][0] for i in held] for held in ranks]
    return max(sum(load[e] / copies[e] for e in ids) for ids in experts), copies, experts


class _Bins:
    """Items packed onto ranks: item indices, loads and (with `distinct`) the experts on each rank."""

    def __init__(self, items: list[Item], slots: list[int], distinct: bool):
        self.items, self.slots, self.distinct = items, slots, distinct
        self.held: list[list[int]] = [[] for _ in slots]
        self.experts: list[set[int]] = [set() for _ in slots]
        self.loads = [0.0] * len(slots)

    def fits(self, i: int, r: int, leaving: int | None = None) -> bool:
        """May item i go on rank r (if item `leaving` leaves it at the same time)?"""
        e = self.items[i][0]
        return (
            not self.distinct
            or e not in self.experts[r]
            or (leaving is not None and self.items[leaving][0] == e)
        )

    def free(self, i: int) -> list[int]:
        return [r for r in range(len(self.slots)) if len(self.held[r]) < self.slots[r] and self.fits(i, r)]

    def add(self, i: int, r: int) -> None:
        self.held[r].append(i)
        self.experts[r].add(self.items[i][0])
        self.loads[r] += self.items[i][1]

    def remove(self, i: int, r: int) -> None:
        self.held[r].remove(i)
        self.experts[r].discard(self.items[i][0])
        self.loads[r] -= self.items[i][1]


def _pack(items: list[Item], slots: list[int], distinct: bool, improve: bool = True) -> list[list[int]]:
    """Item indices per rank: `slots[r]` items on rank r, loads balanced (heaviest first, each onto
    the least loaded rank that can take it); with `distinct`, no two items of one expert on a rank."""
    bins = _Bins(items, slots, distinct)
    for i in sorted(range(len(items)), key=lambda i: (-items[i][1], items[i][0], i)):
        free = bins.free(i) or _make_room(bins, i)
        bins.add(i, min(free, key=lambda r: (bins.loads[r], r)))
    if improve:
        _improve(bins, rounds=4 * len(slots))
    return bins.held


def _make_room(bins: _Bins, i: int) -> list[int]:
    """Every rank with a free slot already hosts item i's expert: move the lightest item that can
    go from a rank not hosting it into such a free slot; returns the ranks item i may go to now."""
    moves = [
        (bins.items[j][1], j, p, q)
        for q in range(len(bins.slots))
        if len(bins.held[q]) < bins.slots[q]
        for p in range(len(bins.slots))
        if p != q and bins.fits(i, p)
        for j in bins.held[p]
        if bins.fits(j, q)
    ]
    if not moves:
        raise PlacementError(f"cannot place a replica of expert {bins.items[i][0]}: every free slot hosts it")
    _, j, p, q = min(moves)
    bins.remove(j, p)
    bins.add(j, q)
    return [p]


def _improve(bins: _Bins, rounds: int) -> None:
    """Swap an item of the most loaded rank with a lighter item elsewhere while that lowers the
    pair's larger load (slot counts stay as they are)."""
    items, loads = bins.items, bins.loads
    for _ in range(rounds):
        p = max(range(len(loads)), key=lambda r: (loads[r], -r))
        best: tuple[float, int, int, int] | None = None  # (new larger load of the pair, i, q, j)
        for i in bins.held[p]:
            for q in range(len(loads)):
                if q == p:
                    continue
                for j in bins.held[q]:
                    delta = items[i][1] - items[j][1]
                    if delta <= 0:
                        continue
                    worse = max(loads[p] - delta, loads[q] + delta)
                    if worse >= loads[p] - 1e-9 or (best is not None and worse >= best[0]):
                        continue
                    if bins.fits(j, p, leaving=i) and bins.fits(i, q, leaving=j):
                        best = (worse, i, q, j)
        if best is None:
            return
        _, i, q, j = best
        bins.remove(i, p)
        bins.remove(j, q)
        bins.add(j, p)
        bins.add(i, q)
