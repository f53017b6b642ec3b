"""DeepSeekMoE (DeepSeek-V2 §2.2): router, routed experts, shared experts, dense MLP.

The router runs all three top-k methods (`greedy`, `group_limited_greedy`, V3's `noaux_tc` whose
`e_score_correction_bias` affects selection only). Routed experts run as grouped matmuls over the
tokens sorted by expert: one matmul per hosted expert with tokens, never a Python loop over tokens;
on CUDA as the fused Triton kernels (`kernels/fused_moe.py`: no loop over experts, no host sync).
Where the routed experts live is not this module's business: `MoE.forward` hands the routing to a
`RoutedExecutor` (`LocalRoutedExecutor` here; an all-to-all one for expert parallelism).
Legend: T tokens, K experts per token, E experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.workers.kernels import widen_gemm
from moeserve.workers.kernels.fused_moe import fused_moe, fused_moe_for
from moeserve.workers.model import fp8
from moeserve.workers.model.config import ModelConfig


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over the fused [..., 2I] projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts. Gate and up are one fused matmul."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * inter_dim, bias=False)  # [gate ; up]
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w13(x)))


class Router(nn.Module):
    """Scores experts and picks K per token. Weights and bias stay fp32 whatever the model dtype."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(
            torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32)
        )
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(config.n_routed_experts, dtype=torch.float32)
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, K] fp32, expert ids [T, K] int64)."""
        cfg = self.config
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.softmax(dim=-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        k = cfg.num_experts_per_tok
        if cfg.topk_method == "greedy":
            weights, ids = scores.topk(k, dim=-1, sorted=False)
        elif cfg.topk_method == "group_limited_greedy":
            grouped = scores.view(-1, cfg.n_group, cfg.experts_per_group)  # [T, G, E/G]
            keep = _group_mask(grouped.amax(dim=-1), cfg.topk_group)  # [T, G]
            masked = (grouped * keep[..., None]).view(-1, cfg.n_routed_experts)
            weights, ids = masked.topk(k, dim=-1, sorted=False)
        else:  # noaux_tc: bias-corrected scores choose, raw scores weigh
            choice = (scores + self.e_score_correction_bias).view(-1, cfg.n_group, cfg.experts_per_group)
            keep = _group_mask(choice.topk(2, dim=-1).values.sum(dim=-1), cfg.topk_group)
            choice = choice.masked_fill(~keep[..., None].bool(), float("-inf")).view(-1, cfg.n_routed_experts)
            ids = choice.topk(k, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
        if cfg.norm_topk_prob and k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids


def _group_mask(group_scores: torch.Tensor, topk_group: int) -> torch.Tensor:
    """[T, G] scores -> [T, G] float mask with ones on the topk_group best groups."""
    chosen = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    return torch.zeros_like(group_scores).scatter_(1, chosen, 1.0)


class RoutedExperts(nn.Module):
    """A set of routed experts stored stacked: w13 [n, 2I, D] (gate ; up) and w2 [n, D, I].

    `expert_ids[i]` is the global id of local expert i; a single process hosts all of them.
    With `fp8_block` the weights stay float8_e4m3fn with per-expert block scales `w13_scale_inv`
    [n, 2 ceil(I/bn), ceil(D/bk)] (gate and up each on their own grid) and `w2_scale_inv`
    [n, ceil(D/bn), ceil(I/bk)]; `dtype` is then the activations' dtype. With `weight_dtype`
    bf16 under fp32 `dtype`, the weights stay bf16 and are widened inside the products
    (`kernels/widen_gemm.py`, the AVX2 hosts' choice).
    """

    def __init__(
        self,
        dim: int,
        inter_dim: int,
        expert_ids: list[int],
        dtype: torch.dtype | None = None,
        fp8_block: tuple[int, int] | None = None,
        weight_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.expert_ids = list(expert_ids)
        self.fp8_block = fp8_block
        self.act_dtype = dtype or torch.get_default_dtype()
        self.widened = weight_dtype is not None and weight_dtype != self.act_dtype and fp8_block is None
        n = len(expert_ids)
        if fp8_block is not None:
            weight_dtype, grad = fp8.FP8, False
        else:
            weight_dtype, grad = (weight_dtype, False) if self.widened else (dtype, True)
        self.w13 = nn.Parameter(torch.empty(n, 2 * inter_dim, dim, dtype=weight_dtype), requires_grad=grad)
        self.w2 = nn.Parameter(torch.empty(n, dim, inter_dim, dtype=weight_dtype), requires_grad=grad)
        self.w13_scale_inv: nn.Parameter | None = None
        self.w2_scale_inv: nn.Parameter | None = None
        if fp8_block is not None:
            s13 = fp8.scale_shape(2 * inter_dim, dim, fp8_block, parts=2)
            self.w13_scale_inv = nn.Parameter(torch.empty(n, *s13), requires_grad=False)
            self.w2_scale_inv = nn.Parameter(
                torch.empty(n, *fp8.scale_shape(dim, inter_dim, fp8_block)), requires_grad=False
            )

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the weights' unless they are fp8 or widened)."""
        return self.act_dtype if self.fp8_block is not None or self.widened else self.w2.dtype

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the weights are held in."""
        return self.w2.dtype

    def fused_scales(self) -> dict[str, object]:
        """Keyword arguments that give `fused_moe` / `fused_moe_torch` the fp8 block scales ({} if none)."""
        if self.fp8_block is None:
            return {}
        return {"w13_scale": self.w13_scale_inv, "w2_scale": self.w2_scale_inv, "block": self.fp8_block}

    def gate_up(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x [M, D] -> [M, 2I] through local expert i's fused gate ; up projection."""
        if self.w13_scale_inv is None or self.fp8_block is None:
            return widen_gemm.linear(x, self.w13[i])
        return fp8.linear(x, fp8.BlockFp8(self.w13[i], self.w13_scale_inv[i], self.fp8_block, parts=2))

    def down(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """h [M, I] -> [M, D] through local expert i's down projection."""
        if self.w2_scale_inv is None or self.fp8_block is None:
            return widen_gemm.linear(h, self.w2[i])
        return fp8.linear(h, fp8.BlockFp8(self.w2[i], self.w2_scale_inv[i], self.fp8_block))

    def dense_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Local expert i's (w13 [2I, D], w2 [D, I]) in the activation dtype (dequantized if fp8)."""
        if self.w13_scale_inv is None or self.w2_scale_inv is None or self.fp8_block is None:
            return self.w13[i].to(self.dtype), self.w2[i].to(self.dtype)
        w13 = fp8.BlockFp8(self.w13[i], self.w13_scale_inv[i], self.fp8_block, parts=2)
        w2 = fp8.BlockFp8(self.w2[i], self.w2_scale_inv[i], self.fp8_block)
        return fp8.dequantize(w13, self.dtype), fp8.dequantize(w2, self.dtype)

    def forward_sorted(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """xs [N, D] sorted by local expert, counts[i] rows for local expert i -> [N, D]."""
        out = torch.empty_like(xs)
        start = 0
        for i, n in enumerate(counts):
            if n:
                rows = xs[start : start + n]
                out[start : start + n] = self.down(swiglu(self.gate_up(rows, i)), i)
                start += n
        return out

    def forward_token(self, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token: x [1, D], its K distinct local_ids / weights [K] -> [1, D]. Reads each chosen
        expert once with no argsort, bincount or token gather (batch-1 decode is bound by such small
        ops), then combines in the grouped path's order, so the result is bit-identical to it."""
        ids = local_ids.tolist()
        order = sorted(range(len(ids)), key=ids.__getitem__)  # ascending expert, as sort_by_expert
        y = torch.cat([self.down(swiglu(self.gate_up(x, ids[j])), ids[j]) for j in order])
        w = weights[torch.tensor(order, device=x.device)][:, None]
        # = combine(y, order, zeros, weights, 1), bit for bit, without its index_add_: right after
        # the expert GEMVs that costs ~1 ms on the CPU (it wakes the thread pool), a sum ~20 us
        return (y * w).to(y.dtype).sum(0, keepdim=True)

    def forward_naive(self, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Reference: every (token, choice) pair on its own. x [T, D], local_ids/weights [T, K] -> [T, D]."""
        out = torch.zeros_like(x, dtype=torch.float32)
        for t in range(x.shape[0]):
            for j in range(local_ids.shape[1]):
                i = int(local_ids[t, j])
                w13, w2 = self.dense_weights(i)
                gate, up = w13.chunk(2, dim=0)
                h = F.silu(x[t] @ gate.t()) * (x[t] @ up.t())
                out[t] += (h @ w2.t()).float() * weights[t, j].float()
        return out.to(x.dtype)


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """ids [T, K] -> (order [T*K] of flattened pairs sorted by expert, token of each, counts [E])."""
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, order // ids.shape[1], counts


def combine(
    y_sorted: torch.Tensor, order: torch.Tensor, token: torch.Tensor, weights: torch.Tensor, t: int
) -> torch.Tensor:
    """Weighted scatter-add of per-pair expert outputs back to their tokens -> [T, D]."""
    w = weights.flatten()[order][:, None]  # [T*K, 1] fp32
    out = torch.zeros(t, y_sorted.shape[-1], dtype=y_sorted.dtype, device=y_sorted.device)
    return out.index_add_(0, token, (y_sorted * w).to(y_sorted.dtype))


class RoutedExecutor(Protocol):
    """Computes sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for one MoE layer."""

    def __call__(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor: ...


class PendingRouted(Protocol):
    """Routed-expert output on its way back; `wait` returns it [T, D]."""

    def wait(self) -> torch.Tensor: ...


@runtime_checkable
class SplitPhaseRoutedExecutor(RoutedExecutor, Protocol):
    """A RoutedExecutor whose experts are elsewhere: `start` sends the tokens and returns at once,
    so the caller can compute (shared experts, another micro-batch) while they are away."""

    def start(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> PendingRouted: ...


class _Done:
    def __init__(self, y: torch.Tensor):
        self.y = y

    def wait(self) -> torch.Tensor:
        return self.y


class PendingMoE:
    """An MoE layer whose routed part is in flight: `wait` returns routed + shared [T, D]."""

    def __init__(self, routed: PendingRouted, shared: torch.Tensor | None):
        self.routed = routed
        self.shared = shared

    def wait(self) -> torch.Tensor:
        y = self.routed.wait()
        return y if self.shared is None else y + self.shared


class LocalRoutedExecutor:
    """Every routed expert in this process: sort, grouped matmuls, combine."""

    def __init__(self, experts_by_layer: dict[int, RoutedExperts]):
        self.experts_by_layer = experts_by_layer

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        experts = self.experts_by_layer[layer]
        if x.is_cuda:  # fused kernels: no loop over experts, no host sync
            return fused_moe(x, experts.w13, experts.w2, ids, weights, **experts.fused_scales())
        if x.shape[0] == 1:  # a token's top-k experts are distinct: nothing to group
            return experts.forward_token(x, ids[0], weights[0])
        order, token, counts = sort_by_expert(ids, len(experts.expert_ids))
        y = experts.forward_sorted(x[token], counts)
        return combine(y, order, token, weights, x.shape[0])


class MoE(nn.Module):
    """Router + routed experts (through an executor) + shared experts."""

    def __init__(self, config: ModelConfig, layer: int, with_routed_experts: bool = True):
        super().__init__()
        self.layer = layer
        self.gate = Router(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.experts = (
            RoutedExperts(
                config.hidden_size, config.moe_intermediate_size, list(range(config.n_routed_experts))
            )
            if with_routed_experts
            else None
        )

    def forward(self, x: torch.Tensor, routed: RoutedExecutor) -> torch.Tensor:
        return self.start(x, routed).wait()

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """Router + this module's own routed experts + shared experts with static shapes and no host
        sync (the fused kernels on CUDA, their torch form elsewhere): the CUDA-graph decode step."""
        if self.experts is None:
            raise ValueError(f"MoE layer {self.layer} holds no routed experts (an attention rank)")
        weights, ids = self.gate(x)
        experts = self.experts
        y = fused_moe_for(x.device)(x, experts.w13, experts.w2, ids, weights, **experts.fused_scales())
        return y if self.shared_experts is None else y + self.shared_experts(x)

    def start(self, x: torch.Tensor, routed: RoutedExecutor) -> PendingMoE:
        """Route x; with a split-phase executor the shared experts run while the tokens are away."""
        weights, ids = self.gate(x)
        if isinstance(routed, SplitPhaseRoutedExecutor):
            pending: PendingRouted = routed.start(self.layer, x, ids, weights)
        else:
            pending = _Done(routed(self.layer, x, ids, weights))
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        return PendingMoE(pending, shared)
