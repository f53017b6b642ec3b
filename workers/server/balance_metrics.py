"""Prometheus view of expert load balancing, from the attention ranks' `RankGauges` (read at scrape).

- `moeserve_expert_rank_tokens{rank, expert_rank}` (gauge): rows attention rank `rank` sent to each
  expert rank in its last step (a token counts once per expert rank it visits);
- `moeserve_expert_rank_imbalance` (gauge): max / mean over expert ranks of those rows summed over
  attention ranks (1 when nothing was routed): the slowest expert rank sets each step's time;
- `moeserve_expert_rebalances_total` (counter): expert-map changes so far;
- `moeserve_expert_map{layer, expert_rank, expert}` (gauge, 1 per hosted replica): the current map,
  as attention rank 0 routes by it (`moeserve experts plot` reads it).
A single-process server has no expert ranks and reports none of them. Nothing here changes behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from moeserve import contract
from moeserve.workers.engine.observe import RankGauges

P = contract.METRICS_PREFIX
HELP = {
    "expert_rank_tokens": "Rows an attention rank sent to each expert rank in its last step",
    "expert_rank_imbalance": "Max over mean of the rows routed to each expert rank in the last step",
    "expert_rebalances": "Expert placement changes made by the online load balancer",
    "expert_map": "1 for each routed expert an expert rank hosts (the current placement map), by MoE layer",
}


class BalanceCollector(Collector):
    def __init__(self) -> None:
        self.ranks: Callable[[], list[RankGauges]] = list

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        ranks = [g for g in self.ranks() if g.expert_rank_tokens]
        if not ranks:
            return
        rows = GaugeMetricFamily(
            f"{P}expert_rank_tokens", HELP["expert_rank_tokens"], labels=["rank", "expert_rank"]
        )
        for g in ranks:
            for e, n in enumerate(g.expert_rank_tokens):
                rows.add_metric([str(g.rank), str(e)], n)
        yield rows
        total = [sum(col) for col in zip(*(g.expert_rank_tokens for g in ranks), strict=True)]
        mean = sum(total) / len(total)
        yield GaugeMetricFamily(
            f"{P}expert_rank_imbalance",
            HELP["expert_rank_imbalance"],
            value=max(total) / mean if mean else 1.0,
        )
        yield CounterMetricFamily(
            f"{P}expert_rebalances", HELP["expert_rebalances"], value=max(g.rebalances for g in ranks)
        )
        first = min(ranks, key=lambda g: g.rank)
        hosted = GaugeMetricFamily(
            f"{P}expert_map", HELP["expert_map"], labels=["layer", "expert_rank", "expert"]
        )
        for layer, per_rank in sorted(first.expert_map.items()):
            for e, experts in enumerate(per_rank):
                for expert in experts:
                    hosted.add_metric([str(layer), str(e), str(expert)], 1)
        yield hosted
