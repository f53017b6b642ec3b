"""Expert placement: which expert rank hosts which routed experts (the same map for every MoE layer).

`ExpertPlacement` is a validated, immutable map from expert rank to global expert ids. The default
is contiguous and balanced; with group-limited routing (`n_group` > 1) whole expert groups are kept
on one rank, so a token, which picks experts from at most `topk_group` groups, reaches at most
`topk_group` expert ranks. A map that does not host every expert exactly once, leaves a rank empty,
or asks for more expert ranks than experts is a `PlacementError` raised before any process starts.
This module knows nothing about processes or collectives; redundant copies of hot experts are not
supported yet.
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
    """`ranks[r]` lists the global expert ids hosted by expert rank r (ascending)."""

    num_experts: int
    ranks: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.ranks:
            raise PlacementError("a placement needs at least one expert rank")
        if len(self.ranks) > self.num_experts:
            raise PlacementError(
                f"{len(self.ranks)} expert ranks for {self.num_experts} experts: "
                "every expert rank must host at least one expert"
            )
        empty = [r for r, ids in enumerate(self.ranks) if not ids]
        if empty:
            raise PlacementError(f"expert rank(s) {empty} host no expert")
        seen: dict[int, int] = {}
        for r, ids in enumerate(self.ranks):
            for e in ids:
                if not 0 <= e < self.num_experts:
                    raise PlacementError(f"expert {e} on rank {r} is out of range [0, {self.num_experts})")
                if e in seen:
                    raise PlacementError(f"expert {e} is hosted twice (ranks {seen[e]} and {r})")
                seen[e] = r
        missing = sorted(set(range(self.num_experts)) - set(seen))
        if missing:
            raise PlacementError(f"expert(s) {missing} are hosted by no rank")

    # construction
    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int) -> ExpertPlacement:
        """Balanced contiguous ranges: rank r hosts [r*n/R, (r+1)*n/R)."""
        _check_rank_count(num_experts, num_ranks)
        bounds = [r * num_experts // num_ranks for r in range(num_ranks + 1)]
        return cls(num_experts, tuple(tuple(range(bounds[r], bounds[r + 1])) for r in range(num_ranks)))

    @classmethod
    def from_lists(cls, num_experts: int, ranks: Sequence[Sequence[int]]) -> ExpertPlacement:
        """An explicit map; validated like every placement."""
        return cls(num_experts, tuple(tuple(sorted(int(e) for e in ids)) for ids in ranks))

    @classmethod
    def for_model(
        cls, config: ModelConfig, num_ranks: int, explicit: Sequence[Sequence[int]] | None = None
    ) -> ExpertPlacement:
        """The explicit map if given, else the default: group-aligned when routing is group-limited.

        Group-aligned: with R <= n_group ranks, rank r hosts whole groups [r*G/R, (r+1)*G/R); with
        more ranks than groups, each group is split over R/G ranks (R must then be a multiple of G)
        so that no rank mixes groups.
        """
        n = config.n_routed_experts
        if explicit is not None:
            if len(explicit) != num_ranks:
                raise PlacementError(f"the map lists {len(explicit)} expert ranks, expected {num_ranks}")
            return cls.from_lists(n, explicit)
        _check_rank_count(n, num_ranks)
        groups = config.n_group if config.topk_method != "greedy" else 1
        if groups <= 1:
            return cls.contiguous(n, num_ranks)
        size = config.experts_per_group
        if num_ranks <= groups:
            bounds = [r * groups // num_ranks * size for r in range(num_ranks + 1)]
            return cls(n, tuple(tuple(range(bounds[r], bounds[r + 1])) for r in range(num_ranks)))
        if num_ranks % groups:
            raise PlacementError(
                f"{num_ranks} expert ranks cannot align with {groups} expert groups: use at most "
                f"{groups} ranks or a multiple of {groups}"
            )
        per_group = cls.contiguous(size, num_ranks // groups)
        return cls(
            n, tuple(tuple(g * size + e for e in ids) for g in range(groups) for ids in per_group.ranks)
        )

    # queries
    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    def rank_of_expert(self) -> torch.Tensor:
        """[n_experts] int64: the expert rank hosting each global expert."""
        out = torch.empty(self.num_experts, dtype=torch.long)
        for r, ids in enumerate(self.ranks):
            out[list(ids)] = r
        return out

    def local_index(self) -> torch.Tensor:
        """[n_experts] int64: each expert's index among its rank's experts."""
        out = torch.empty(self.num_experts, dtype=torch.long)
        for ids in self.ranks:
            out[list(ids)] = torch.arange(len(ids))
        return out

    def max_ranks_per_token(self, config: ModelConfig) -> int:
        """Upper bound on the expert ranks one token's top-k choices can reach under this map."""
        k = config.num_experts_per_tok
        if config.topk_method == "greedy" or config.n_group <= 1:
            return min(k, self.num_ranks)
        owner = self.rank_of_expert().view(config.n_group, config.experts_per_group)  # [G, E/G]
        ranks_per_group = [len(set(row.tolist())) for row in owner]
        worst_groups = sorted(ranks_per_group, reverse=True)[: config.topk_group]
        return min(k, self.num_ranks, sum(worst_groups))


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
