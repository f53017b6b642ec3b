"""Token dispatch and combine between attention ranks and expert ranks (all-to-all, variable splits).

Per MoE layer and micro-batch, every rank of the world joins the same four collectives, in order:
1. counts: all-to-all of [N] int64, the rows each rank sends to each rank;
2. dispatch: all-to-all of hidden states [M, D], local expert ids [M, K] (int32, -1 where the
   choice lives on another rank) and routing weights [M, K] fp32; a token goes to each expert rank
   hosting one of its choices, once, whatever the number of its choices there; no token is dropped;
   a replicated expert's tokens go to one replica each, by token index (`placement.Routes`);
3. (expert ranks) group the received (token, choice) pairs by local expert, run them with
   `RoutedExperts.forward_sorted` and sum each token's weighted outputs;
4. combine: all-to-all of those partial sums [M, D] back; the attention rank adds them up per token.
Attention ranks never block in `start`: they need no counts back (they receive nothing in (2)
and know what returns in (4)), so they start (1), (2) and (4) at once, and the shared experts
(and, with ping-pong, the other micro-batch) run while their tokens are away. Expert ranks never send to
attention ranks in (2), attention ranks never receive in it; both just use zero-sized splits.
This module moves tensors; it does not decide steps, micro-batches or placement.
Legend: T tokens, K choices per token, M rows sent/received, D hidden, N world size, R expert ranks.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moeserve.workers.kernels.fused_moe import fused_moe
from moeserve.workers.model.moe import RoutedExperts, combine, sort_by_expert
from moeserve.workers.parallel.placement import ExpertPlacement, Routes
from moeserve.workers.parallel.rebalance import ExpertBalancer
from moeserve.workers.parallel.world import EPWorld, StepControl


@dataclass
class DispatchStats:
    """Counters of one rank: seconds per phase, bytes through all-to-all, and layer calls."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    bytes_sent: int = 0
    bytes_received: int = 0
    layer_calls: int = 0  # MoE layer x micro-batch invocations
    max_ranks_per_token: int = 0  # most expert ranks one token was sent to

    def reset(self) -> None:
        """Forget everything so far (e.g. the prefill step, to profile decode alone)."""
        self.seconds.clear()
        self.bytes_sent = self.bytes_received = self.layer_calls = self.max_ranks_per_token = 0

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - since
        return now

    def as_dict(self) -> dict[str, object]:
        return {
            "seconds": dict(self.seconds),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "layer_calls": self.layer_calls,
            "max_ranks_per_token": self.max_ranks_per_token,
        }


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class PendingCombine:
    """The routed output of one attention-rank MoE call, on its way back from the expert ranks."""

    def __init__(
        self,
        executor: AllToAllExecutor,
        layer: int,
        token: torch.Tensor,
        out: torch.Tensor,
        works: list[dist.Work],
        num_tokens: int,
        keep: list[torch.Tensor],
    ):
        self.executor = executor
        self.layer = layer
        self.token = token  # [M] token row of each returned row
        self.out = out  # [M, D] partial sums, filled by the combine
        self.works = works
        self.num_tokens = num_tokens
        self._keep = keep  # send buffers must outlive the collectives

    def wait(self) -> torch.Tensor:
        """[T, D]: the sum of each token's partial results from every expert rank it visited."""
        ex = self.executor
        t0 = time.perf_counter()
        ex.world.wait(self.works, f"dispatch/combine of MoE layer {self.layer}")
        y = torch.zeros(self.num_tokens, self.out.shape[-1], dtype=self.out.dtype, device=self.out.device)
        y.index_add_(0, self.token, self.out)
        self._keep.clear()
        if ex.stats is not None:
            ex.stats.add("combine", t0)
        return y


class AllToAllExecutor:
    """The `RoutedExecutor` of an attention rank: its routed experts live on the expert ranks."""

    def __init__(
        self,
        world: EPWorld,
        placement: ExpertPlacement,
        stats: DispatchStats | None = None,
        balancer: ExpertBalancer | None = None,
    ):
        if placement.num_ranks != world.layout.expert_ranks:
            raise ValueError(
                f"placement has {placement.num_ranks} expert ranks, the world {world.layout.expert_ranks}"
            )
        self.world = world
        self.stats = stats
        self.num_ranks = placement.num_ranks
        self.routes = Routes(placement, world.device)  # every layer's, unless the balancer has its own
        self.balancer = balancer
        if balancer is not None:
            world.between_steps = balancer  # it swaps its per-layer routes between two steps

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.start(layer, x, ids, weights).wait()

    def start(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> PendingCombine:
        """Send x [T, D] with ids, weights [T, K] to the expert ranks; returns before they answer."""
        t0 = time.perf_counter()
        world, a = self.world, self.world.layout.attention_ranks
        t = ids.shape[0]
        routes = self.balancer.routes[layer] if self.balancer is not None else self.routes
        dest, index = routes.route(ids, salt=world.rank)  # [T, K] expert rank and local index of each choice
        hit = torch.zeros(t, self.num_ranks, dtype=torch.bool, device=x.device)
        hit.scatter_(1, dest, True)  # [T, R] which ranks each token visits
        rank, token = hit.t().nonzero(as_tuple=True)  # [M] rows ordered by rank, then token
        counts = hit.sum(dim=0)  # [R]
        local = torch.where(dest[token] == rank[:, None], index[token], -1)  # [M, K]
        if self.balancer is not None:
            self.balancer.record(layer, ids, counts)
        xs, local, w = x[token], local.to(torch.int32), weights[token].float()  # [M, D], [M, K], [M, K]

        send = torch.zeros(world.layout.size, dtype=torch.long, device=x.device)
        send[a:] = counts
        what = f"dispatch of MoE layer {layer}"
        # this rank receives nothing in the dispatch, so it need not wait for the counts
        recv, counts_work = world.start_count_exchange(send, f"token counts of MoE layer {layer}")
        splits = send.tolist()
        none = [0] * world.layout.size
        d, k = x.shape[-1], ids.shape[-1]
        works = [
            counts_work,
            world.all_to_all(xs.new_empty(0, d), xs, none, splits, what),  # [M, D] -> [0, D]
            world.all_to_all(local.new_empty(0, k), local, none, splits, what),  # [M, K] -> [0, K]
            world.all_to_all(w.new_empty(0, k), w, none, splits, what),  # [M, K] -> [0, K]
        ]
        out, combine_send = torch.empty_like(xs), xs.new_empty(0, d)
        what = f"combine of MoE layer {layer}"
        works.append(world.all_to_all(out, combine_send, splits, none, what))  # [0, D] -> [M, D]
        if self.stats is not None:
            self.stats.layer_calls += 1
            self.stats.bytes_sent += _nbytes(send, xs, local, w)
            self.stats.bytes_received += _nbytes(send, out)
            if t:
                self.stats.max_ranks_per_token = max(self.stats.max_ranks_per_token, int(hit.sum(1).max()))
            self.stats.add("dispatch", t0)
        return PendingCombine(self, layer, token, out, works, t, [xs, local, w, send, recv, combine_send])


class LockstepPasses:
    """An attention rank's routed executor that keeps each step's MoE calls in the order every rank
    of the world follows: `order` lists the layer of each call in a step (each MoE layer once, then
    the MTP layer K times with `--speculative mtp`: the expert ranks serve it that often every
    step, whatever there is to draft). `finish_step` joins the calls this rank's step did not make
    (an MTP pass with nothing to draft) with empty dispatches; a call out of order raises instead of
    leaving the world waiting on mismatched collectives."""

    def __init__(self, inner: AllToAllExecutor, order: list[int], hidden_size: int, top_k: int):
        self.inner = inner
        self.order = list(order)
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.dtype: torch.dtype = torch.float32  # activations' dtype, from the last real call
        self._next = 0

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.start(layer, x, ids, weights).wait()

    def start(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> PendingCombine:
        if self._next >= len(self.order) or self.order[self._next] != layer:
            expected = self.order[self._next] if self._next < len(self.order) else "none (step complete)"
            raise RuntimeError(f"MoE layer {layer} called out of the lockstep order: expected {expected}")
        self._next += 1
        self.dtype = x.dtype
        return self.inner.start(layer, x, ids, weights)

    def finish_step(self) -> None:
        """Make the rest of this step's calls with no tokens; call once after every step."""
        dev = self.inner.world.device
        while self._next < len(self.order):
            layer = self.order[self._next]
            self._next += 1
            x = torch.empty(0, self.hidden_size, dtype=self.dtype, device=dev)
            ids = torch.empty(0, self.top_k, dtype=torch.long, device=dev)
            self.inner(layer, x, ids, torch.empty(0, self.top_k, device=dev))
        self._next = 0


class ExpertServer:
    """The serving loop of an expert rank: answer every dispatch of every step until told to stop."""

    def __init__(
        self,
        world: EPWorld,
        experts_by_layer: dict[int, RoutedExperts],
        top_k: int,
        stats: DispatchStats | None = None,
        balancer: ExpertBalancer | None = None,
        passes: dict[int, int] | None = None,
    ):
        """`passes[layer]`: dispatches of that layer every step, whatever the micro-batches (the
        MTP layer's K with `--speculative mtp`, see `LockstepPasses`)."""
        self.world = world
        self.top_k = top_k
        self.experts_by_layer = experts_by_layer  # a rebalance replaces its entries between steps
        self.passes = dict(passes or {})
        self.stats = stats
        if balancer is not None:
            if balancer.experts is not experts_by_layer:
                raise ValueError("the balancer must hold this server's experts")
            world.between_steps = balancer
        self._sending: list[tuple[dist.Work, list[torch.Tensor]]] = []  # buffers outlive their sends

    def serve(
        self,
        on_step: Callable[[int], None] | None = None,
        stop: threading.Event | None = None,
        idle_s: float = 0.005,
    ) -> int:
        """Serve the attention ranks' steps in lockstep; returns the number of steps served.

        Offline (`stop` None): until a step in which no attention rank has work. Serving: idle
        `idle_s` while nobody has work, until any rank asks to stop (setting `stop` makes this rank
        ask). `on_step(i)` runs as step i begins (the same step index the attention ranks see)."""
        steps = 0
        while True:
            agreed = self.world.control(StepControl(stop=stop is not None and stop.is_set()))
            if agreed.stop or (stop is None and not agreed.work):
                self._drain()
                return steps
            if not agreed.work:
                time.sleep(idle_s)
                continue
            if on_step is not None:
                on_step(steps)
            for layer in sorted(self.experts_by_layer):
                for _ in range(self.passes.get(layer, max(1, agreed.micro_batches))):
                    self.serve_layer(layer)
            self._drain()
            steps += 1

    def serve_layer(self, layer: int) -> None:
        """One dispatch -> grouped expert matmuls -> combine, for every attention rank at once."""
        world, experts, stats = self.world, self.experts_by_layer[layer], self.stats
        t0 = time.perf_counter()
        size, dtype, dev = world.layout.size, experts.dtype, world.device  # activations' dtype
        send = torch.zeros(size, dtype=torch.long, device=dev)
        recv = world.exchange_counts(send, f"token counts of MoE layer {layer}")  # [N] -> [N]
        m, d, k = sum(recv), experts.w2.shape[1], self.top_k
        none = [0] * size
        xs = torch.empty(m, d, dtype=dtype, device=dev)
        local = torch.empty(m, k, dtype=torch.int32, device=dev)
        w = torch.empty(m, k, dtype=torch.float32, device=dev)
        what = f"dispatch of MoE layer {layer}"
        world.wait(
            [
                world.all_to_all(xs, xs.new_empty(0, d), recv, none, what),  # [0, D] -> [M, D]
                world.all_to_all(local, local.new_empty(0, k), recv, none, what),  # [0, K] -> [M, K]
                world.all_to_all(w, w.new_empty(0, k), recv, none, what),  # [0, K] -> [M, K]
            ],
            what,
        )
        if stats is not None:
            t0 = stats.add("receive", t0)
        n_local = len(experts.expert_ids)
        bucket = torch.where(local < 0, n_local, local.long())  # [M, K]; bucket n_local: not ours
        if xs.is_cuda:  # fused kernels: foreign pairs (bucket n_local) add nothing
            partial = fused_moe(
                xs, experts.w13, experts.w2, bucket, w, foreign=True, **experts.fused_scales()
            )  # [M, D]
        else:
            order, token, counts = sort_by_expert(bucket, n_local + 1)
            pairs = sum(counts[:n_local])  # the foreign bucket sorts last
            order, token = order[:pairs], token[:pairs]
            y = experts.forward_sorted(xs[token], counts[:n_local])  # [P, D]
            partial = combine(y, order, token, w, m)  # [M, D] each token's weighted sum over our experts
        if stats is not None:
            t0 = stats.add("expert", t0)
        self._drain()
        what = f"combine of MoE layer {layer}"
        empty = partial.new_empty(0, d)
        work = world.all_to_all(empty, partial, none, recv, what)  # [M, D] -> [0, D]
        self._sending.append((work, [empty, partial]))
        if stats is not None:
            stats.layer_calls += 1
            stats.bytes_received += _nbytes(send, xs, local, w)
            stats.bytes_sent += _nbytes(send, partial)
            stats.add("send", t0)

    def _drain(self) -> None:
        """Wait for this rank's combine sends still in flight (end of a step)."""
        if self._sending:
            self.world.wait([work for work, _ in self._sending], "combine")
            self._sending.clear()
