"""Expert placement: which expert rank hosts which routed experts.

`ExpertPlacement` is a validated, immutable map from expert rank to global expert ids. The default
is contiguous and balanced; with group-limited routing (`n_group` > 1) whole expert groups are kept
on one rank, so a token, which picks experts from at most `topk_group` groups, reaches at most
`topk_group` expert ranks. With `redundant` R > 0 the map has R extra expert slots: an expert may
be hosted by several ranks (at most once per rank), and each routed (token, choice) goes to one of
its replicas, chosen by token index (`route`), so which replica ran never depends on timing. A map
that does not host every expert, hosts one twice on a rank, has other than n + R slots, leaves a
rank empty, or asks for more expert ranks than experts is a `PlacementError` raised before any
process starts. This module knows nothing about processes or collectives; which map serves best
for a measured load is `eplb`'s business.
Legend: T tokens, K choices per token, n experts, C most replicas of one expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeserve.workers.model.config import ModelConfig


class PlacementError(ValueError):
    """An expert placement that cannot serve the model; the message names the problem."""


@dataclass(frozen=True)
class ExpertPlacement:
    """`ranks[r]` lists the global expert ids hosted by expert rank r (ascending, each at most once).

    `redundant` is the number of slots beyond one per expert: the map has n + redundant slots."""

    num_experts: int
    ranks: tuple[tuple[int, ...], ...]
    redundant: int = 0

    def __post_init__(self) -> None:
        if not self.ranks:
            raise PlacementError("a placement needs at least one expert rank")
        if len(self.ranks) > self.num_experts:
            raise PlacementError(
                f"{len(self.ranks)} expert ranks for {self.num_experts} experts: "
                "every expert rank must host at least one expert"
            )
        check_redundant(self.num_experts, len(self.ranks), self.redundant)
        empty = [r for r, ids in enumerate(self.ranks) if not ids]
        if empty:
            raise PlacementError(f"expert rank(s) {empty} host no expert")
        seen: dict[int, int] = {}
        for r, ids in enumerate(self.ranks):
            if len(set(ids)) != len(ids):
                twice = sorted({e for e in ids if ids.count(e) > 1})
                raise PlacementError(f"expert(s) {twice} are hosted twice on rank {r}")
            for e in ids:
                if not 0 <= e < self.num_experts:
                    raise PlacementError(f"expert {e} on rank {r} is out of range [0, {self.num_experts})")
                if e in seen and not self.redundant:
                    raise PlacementError(f"expert {e} is hosted twice (ranks {seen[e]} and {r})")
                seen.setdefault(e, r)
        missing = sorted(set(range(self.num_experts)) - set(seen))
        if missing:
            raise PlacementError(f"expert(s) {missing} are hosted by no rank")
        slots = sum(len(ids) for ids in self.ranks)
        if slots != self.num_experts + self.redundant:
            raise PlacementError(
                f"the map has {slots} expert slots; {self.num_experts} experts with "
                f"{self.redundant} redundant slots need {self.num_experts + self.redundant}"
            )

    # construction
    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int) -> ExpertPlacement:
        """Balanced contiguous ranges: rank r hosts [r*n/R, (r+1)*n/R)."""
        _check_rank_count(num_experts, num_ranks)
        bounds = [r * num_experts // num_ranks for r in range(num_ranks + 1)]
        return cls(num_experts, tuple(tuple(range(bounds[r], bounds[r + 1])) for r in range(num_ranks)))

    @classmethod
    def from_lists(
        cls, num_experts: int, ranks: Sequence[Sequence[int]], redundant: int = 0
    ) -> ExpertPlacement:
        """An explicit map; validated like every placement."""
        return cls(num_experts, tuple(tuple(sorted(int(e) for e in ids)) for ids in ranks), redundant)

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        num_ranks: int,
        explicit: Sequence[Sequence[int]] | None = None,
        redundant: int = 0,
    ) -> ExpertPlacement:
        """The explicit map if given, else the default: group-aligned when routing is group-limited,
        plus `redundant` extra slots (`with_redundant_slots`).

        Group-aligned: with R <= n_group ranks, rank r hosts whole groups [r*G/R, (r+1)*G/R); with
        more ranks than groups, each group is split over R/G ranks (R must then be a multiple of G)
        so that no rank mixes groups.
        """
        n = config.n_routed_experts
        if explicit is not None:
            if len(explicit) != num_ranks:
                raise PlacementError(f"the map lists {len(explicit)} expert ranks, expected {num_ranks}")
            return cls.from_lists(n, explicit, redundant)
        _check_rank_count(n, num_ranks)
        check_redundant(n, num_ranks, redundant)
        groups = config.n_group if config.topk_method != "greedy" else 1
        if groups <= 1:
            return cls.contiguous(n, num_ranks).with_redundant_slots(redundant)
        size = config.experts_per_group
        if num_ranks <= groups:
            bounds = [r * groups // num_ranks * size for r in range(num_ranks + 1)]
            base = cls(n, tuple(tuple(range(bounds[r], bounds[r + 1])) for r in range(num_ranks)))
            return base.with_redundant_slots(redundant)
        if num_ranks % groups:
            raise PlacementError(
                f"{num_ranks} expert ranks cannot align with {groups} expert groups: use at most "
                f"{groups} ranks or a multiple of {groups}"
            )
        per_group = cls.contiguous(size, num_ranks // groups)
        base = cls(
            n, tuple(tuple(g * size + e for e in ids) for g in range(groups) for ids in per_group.ranks)
        )
        return base.with_redundant_slots(redundant)

    def with_redundant_slots(self, extra: int) -> ExpertPlacement:
        """This map plus `extra` slots, before any load is known: each goes to the rank with the fewest
        slots (lowest index on ties) and hosts the next expert, cycling from that rank's own last one,
        that the rank does not host yet. A measured load places replicas better (`eplb`)."""
        check_redundant(self.num_experts, self.num_ranks, self.redundant + extra)
        ranks = [list(ids) for ids in self.ranks]
        for _ in range(extra):
            r = min(range(len(ranks)), key=lambda i: (len(ranks[i]), i))
            e = (max(ranks[r]) + 1) % self.num_experts
            while e in ranks[r]:
                e = (e + 1) % self.num_experts
            ranks[r].append(e)
        return ExpertPlacement.from_lists(self.num_experts, ranks, self.redundant + extra)

    # queries
    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    @property
    def slots_per_rank(self) -> list[int]:
        return [len(ids) for ids in self.ranks]

    def replicas(self) -> list[list[int]]:
        """For each expert, the ranks hosting it (ascending)."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for r, ids in enumerate(self.ranks):
            for e in ids:
                out[e].append(r)
        return out

    def rank_of_expert(self) -> torch.Tensor:
        """[n] int64: the first (lowest) expert rank hosting each global expert."""
        return self.replica_table()[0][:, 0].clone()

    def local_index(self) -> torch.Tensor:
        """[n] int64: each expert's index among the experts of its first rank."""
        return self.replica_table()[1][:, 0].clone()

    def replica_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rank [n, C], local index on that rank [n, C], replica count [n]); padding repeats the first
        replica, so any index below C is a valid rank."""
        hosts = self.replicas()
        c = max(len(h) for h in hosts)
        rank = torch.tensor([h + [h[0]] * (c - len(h)) for h in hosts], dtype=torch.long)  # [n, C]
        position = [{e: i for i, e in enumerate(ids)} for ids in self.ranks]
        local = torch.tensor([[position[r][e] for r in row] for e, row in enumerate(rank.tolist())])  # [n, C]
        return rank, local.long(), torch.tensor([len(h) for h in hosts], dtype=torch.long)

    def max_ranks_per_token(self, config: ModelConfig) -> int:
        """Upper bound on the expert ranks one token's top-k choices can reach under this map."""
        k = config.num_experts_per_tok
        if config.topk_method == "greedy" or config.n_group <= 1:
            return min(k, self.num_ranks)
        hosts = self.replicas()
        size = config.experts_per_group
        ranks_per_group = [
            len({r for e in range(g * size, (g + 1) * size) for r in hosts[e]}) for g in range(config.n_group)
        ]
        worst_groups = sorted(ranks_per_group, reverse=True)[: config.topk_group]
        return min(k, self.num_ranks, sum(worst_groups))

    def describe(self) -> str:
        """One line: slots per rank and the experts each rank hosts (replicated ones marked '*')."""
        hosts = self.replicas()
        parts = [
            f"rank {r}: {len(ids)} slots ["
            + ",".join(f"{e}*" if len(hosts[e]) > 1 else str(e) for e in ids)
            + "]"
            for r, ids in enumerate(self.ranks)
        ]
        return f"{self.num_experts} experts + {self.redundant} redundant slots; " + "; ".join(parts)


class Routes:
    """Device tables of one placement for the dispatch: where each (token, choice) goes.

    Replica j of expert e serves the tokens with (token index + salt) % count[e] == j, so a
    replicated expert's tokens are spread evenly and deterministically over its replicas."""

    def __init__(self, placement: ExpertPlacement, device: torch.device | str = "cpu"):
        self.placement = placement
        rank, local, count = placement.replica_table()
        self.rank = rank.to(device)  # [n, C]
        self.local = local.to(device)  # [n, C]
        self.count = count.to(device)  # [n]
        self.redundant = bool(placement.redundant)

    def route(self, ids: torch.Tensor, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [T, K] global expert ids -> (expert rank [T, K], local expert index there [T, K])."""
        if not self.redundant:
            return self.rank[ids, 0], self.local[ids, 0]
        token = torch.arange(ids.shape[0], device=ids.device)[:, None] + salt  # [T, 1]
        replica = token % self.count[ids]  # [T, K]
        return self.rank[ids, replica], self.local[ids, replica]


def check_redundant(num_experts: int, num_ranks: int, redundant: int) -> None:
    """R extra slots must fit: a rank hosts an expert at most once, so R <= n * (ranks - 1)."""
    if redundant < 0:
        raise PlacementError(f"redundant experts must be >= 0, got {redundant}")
    most = num_experts * (num_ranks - 1)
    if redundant > most:
        raise PlacementError(
            f"{redundant} redundant expert slots over {num_ranks} expert rank(s) of {num_experts} experts: "
            f"a rank hosts an expert at most once, so at most {most} fit"
        )


def _check_rank_count(num_experts: int, num_ranks: int) -> None:
    if num_ranks < 1:
        raise PlacementError(f"need at least one expert rank, got {num_ranks}")
    if num_ranks > num_experts:
        raise PlacementError(
            f"{num_ranks} expert ranks for {num_experts} experts: every expert rank must host at least one"
        )


def parse_map(text: str) -> list[list[int]]:
    """`"0-3,8;4-7"` -> [[0, 1, 2, 3, 8], [4, 5, 6, 7]]: ranks split by ';', ids or ranges by ','."""
    ranks: list[list[int]] = []
    for part in text.split(";"):
        ids: list[int] = []
        for item in filter(None, (s.strip() for s in part.split(","))):
            lo, sep, hi = item.partition("-")
            try:
                ids.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
            except ValueError:
                raise PlacementError(f"cannot read expert ids {item!r} in map {text!r}") from None
        ranks.append(ids)
    return ranks
