"""Multi-head Latent Attention (DeepSeek-V2 §2.1) over the paged latent cache.

Two paths over the same cache:
- naive (prefill): expand the cached latents with `wkv_b` into per-head keys and values, then
  ordinary causal attention;
- absorbed (decode): fold W_UK into the query and W_UV after the attention, so attention is MQA
  over the cached `[c_KV ; k_pe]` rows and nothing per-head is ever materialised for the context.
  On CUDA it reads the paged cache in place (Triton, `kernels/mla_decode.py`); on the CPU an fp32
  cache is read in place too where the AVX2 kernel runs (`kernels/mla_decode_cpu.py`), else the
  blocks are gathered for batched matmuls (`_absorbed`, also the bf16 path of AVX-512 hosts).
`forward_decode` is the absorbed path alone with static shapes, for CUDA graphs.
`attn_impl="naive"` forces the naive path everywhere; tests use it as the reference.
Legend: T tokens, H heads, L context, B decode sequences, C kv_lora_rank, R rope dim,
N nope dim, V value dim, D hidden.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.workers.kernels import mla_decode_cpu, widen_gemm
from moeserve.workers.kernels.cpu_capability import slow_16bit
from moeserve.workers.kernels.mla_decode import num_splits, paged_mla_decode_for
from moeserve.workers.kernels.mla_decode_cpu import paged_mla_decode_cpu
from moeserve.workers.kernels.widen_gemm import WidenedLinear
from moeserve.workers.model.batch import DecodeInputs, ForwardBatch
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.huge_pages import on_huge_pages
from moeserve.workers.model.kv_cache import PagedLatentCache
from moeserve.workers.model.norm import RMSNorm
from moeserve.workers.model.rope import RotaryEmbedding

AttnImpl = Literal["auto", "naive"]


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.scale = config.softmax_scale
        d, h, qk = config.hidden_size, config.num_attention_heads, config.qk_head_dim
        bias = config.attention_bias
        self.q_lora = config.q_lora_rank is not None
        if config.q_lora_rank is None:
            self.wq = nn.Linear(d, h * qk, bias=False)
        else:
            self.wq_a = nn.Linear(d, config.q_lora_rank, bias=bias)
            self.q_norm = RMSNorm(config.q_lora_rank)
            self.wq_b = nn.Linear(config.q_lora_rank, h * qk, bias=False)
        self.wkv_a = nn.Linear(d, config.kv_lora_rank + config.qk_rope_head_dim, bias=bias)
        self.kv_norm = RMSNorm(config.kv_lora_rank)
        self.wkv_b = nn.Linear(
            config.kv_lora_rank, h * (config.qk_nope_head_dim + config.v_head_dim), bias=False
        )
        self.wo = nn.Linear(h * config.v_head_dim, d, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cache: PagedLatentCache,
        rope: RotaryEmbedding,
        attn_impl: AttnImpl = "auto",
    ) -> torch.Tensor:
        t = x.shape[0]
        if batch.rope_tables is None:  # the same for every layer of this step
            batch.rope_tables = rope.tables(batch.positions)
        q_nope, q_pe = self._project(x, batch.positions, batch.rope_tables, batch.slots, cache, rope)
        out = x.new_empty(t, self.n_heads, self.v_dim)  # [T, H, V]
        naive_seqs = range(batch.num_seqs) if attn_impl == "naive" else batch.prefill_seqs
        for s in naive_seqs:
            rows = slice(batch.starts[s], batch.starts[s] + batch.lengths[s])
            context = batch.cached[s] + batch.lengths[s]
            latent = cache.gather(self.layer, batch.block_tables[s], context)  # [L, C+R]
            out[rows] = self._naive(q_nope[rows], q_pe[rows], latent, batch.cached[s])
        if attn_impl == "auto" and batch.decode_rows.numel():
            rows_t = batch.decode_rows
            q_nope_d, q_pe_d = (q_nope, q_pe) if batch.all_decode else (q_nope[rows_t], q_pe[rows_t])
            if x.is_cuda:  # the paged kernel reads the blocks in place
                tables = batch.decode_block_tables
                splits = num_splits(tables.shape[0], self.n_heads, tables.shape[1] * cache.block_size)
                o = self._absorbed_paged(q_nope_d, q_pe_d, cache, tables, batch.decode_context, splits)
            elif mla_decode_cpu.supports(q_nope_d, cache.layers[self.layer], self.kv_rank):  # fp32, AVX2
                o = self._absorbed_in_place(q_nope_d, q_pe_d, cache, batch)
            else:
                latents = cache.gather_batch(self.layer, batch.decode_block_tables)  # [B, L, C+R]
                o = self._absorbed(q_nope_d, q_pe_d, latents, batch.decode_padding)
            if batch.all_decode:  # rows are the decode rows: no scatter
                out = o
            else:
                out[rows_t] = o
        return self.wo(out.reshape(t, self.n_heads * self.v_dim))

    def forward_decode(
        self,
        x: torch.Tensor,
        inputs: DecodeInputs,
        tables: torch.Tensor,
        cache: PagedLatentCache,
        rope: RotaryEmbedding,
        splits: int,
    ) -> torch.Tensor:
        """One token per sequence, static shapes, no host sync (CUDA-graph capturable): the paged
        absorbed attention (Triton on CUDA, its torch form elsewhere). x [B, D] -> [B, D]."""
        b = x.shape[0]
        q_nope, q_pe = self._project(x, inputs.positions, tables, inputs.slots, cache, rope)
        out = self._absorbed_paged(q_nope, q_pe, cache, inputs.block_tables, inputs.context_lens, splits)
        return self.wo(out.reshape(b, self.n_heads * self.v_dim))

    def _project(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        tables: torch.Tensor,
        slots: torch.Tensor,
        cache: PagedLatentCache,
        rope: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query halves q_nope [T, H, N], rotated q_pe [T, H, R]; writes [c_KV ; k_pe] to the cache."""
        t = x.shape[0]
        q, kv = self._input_projections(x)  # [T, H*(N+R)] or [T, q_lora_rank]; [T, C+R]
        q = self.wq_b(self.q_norm(q)) if self.q_lora else q
        q = q.view(t, self.n_heads, self.nope_dim + self.rope_dim)  # [T, H, N+R]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv = self.kv_norm(kv[:, : self.kv_rank])
        k_pe = kv[:, self.kv_rank :].view(t, 1, self.rope_dim)
        qk_pe = rope(torch.cat([q_pe, k_pe], dim=1), positions, tables)  # [T, H+1, R]
        q_pe, k_pe = qk_pe[:, : self.n_heads], qk_pe[:, self.n_heads].contiguous()  # [T, H, R], [T, R]
        cache.write(self.layer, slots, torch.cat([c_kv, k_pe], dim=-1))
        return q_nope, q_pe

    def _input_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two projections of x (query side, compressed KV) as one matmul once fused."""
        first = self.wq_a if self.q_lora else self.wq
        fused = getattr(self, "_fused_input", None)
        if fused is None or fused.dtype != first.weight.dtype or fused.device != first.weight.device:
            return first(x), self.wkv_a(x)  # not fused, or the module was moved since (stale)
        out = widen_gemm.linear(x, fused)  # [T, n_q + C + R]
        q, kv = out.split([first.weight.shape[0], self.wkv_a.weight.shape[0]], dim=-1)
        if first.bias is not None:
            q = q + first.bias
        if self.wkv_a.bias is not None:
            kv = kv + self.wkv_a.bias
        return q, kv

    def fuse_input_projections(self) -> None:
        """Store the query-side and KV-down weights in one tensor (both read x), so decode reads them
        in one matmul; the two parameters become views of it, so nothing is duplicated. Weights kept
        fp8 (`BlockFp8Linear`, each on its own block grid) stay two products."""
        first = self.wq_a if self.q_lora else self.wq
        if type(first) is not type(self.wkv_a) or not isinstance(first, nn.Linear | WidenedLinear):
            return
        with torch.no_grad():
            fused = on_huge_pages(torch.cat([first.weight, self.wkv_a.weight]))  # [n_q + C + R, D]
        n = first.weight.shape[0]
        first.weight = nn.Parameter(fused[:n], requires_grad=False)
        self.wkv_a.weight = nn.Parameter(fused[n:], requires_grad=False)
        self._fused_input = fused

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, N, C] and W_UV^T [H, C, V], contiguous, on huge pages (decode reads them every
        step); built once (weights are frozen at load)."""
        cached = getattr(self, "_absorbed_cache", None)
        if cached is None or cached[0].dtype != self.wkv_b.weight.dtype:
            w = self.wkv_b.weight.detach().view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
            w_uk, w_uv_t = w[:, : self.nope_dim], w[:, self.nope_dim :].transpose(1, 2)
            cached = (on_huge_pages(w_uk), on_huge_pages(w_uv_t))
            self._absorbed_cache = cached
        return cached

    def _widened_absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """In a widened layer (bf16 weights under fp32, `WidenedLinear`), W_UK^T [H, C, N] and W_UV
        [H, V, C] in bf16 as rows for `widen_gemm.linear_batched`: half the bytes the absorbed decode
        reads per step. Only when wkv_b's values are bf16 ones (exact); None otherwise."""
        if not isinstance(self.wo, WidenedLinear) or not widen_gemm.available():
            return None
        cached = getattr(self, "_widened_absorbed", None)
        if cached is None:
            w = self.wkv_b.weight.detach().view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
            narrow = w.to(torch.bfloat16)
            if not torch.equal(narrow.float(), w.float()):
                cached = ()
            else:
                w_uk_t = narrow[:, : self.nope_dim].transpose(1, 2)  # [H, C, N]
                cached = (on_huge_pages(w_uk_t), on_huge_pages(narrow[:, self.nope_dim :]))  # [H, V, C]
            self._widened_absorbed = cached
        return cached or None

    def _absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [B, H, N] -> q_nope W_UK [B, H, C]."""
        widened = self._widened_absorbed_weights() if not q_nope.is_cuda else None
        if widened is not None:
            return widen_gemm.linear_batched(q_nope.transpose(0, 1), widened[0]).transpose(0, 1)
        return torch.bmm(q_nope.transpose(0, 1), self._absorbed_weights()[0]).transpose(0, 1)

    def _apply_w_uv(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat [B, H, C] -> o_lat W_UV^T [B, H, V]."""
        widened = self._widened_absorbed_weights() if not o_lat.is_cuda else None
        if widened is not None and o_lat.dtype == torch.float32:
            return widen_gemm.linear_batched(o_lat.transpose(0, 1), widened[1]).transpose(0, 1)
        w_uv_t = self._absorbed_weights()[1]
        return torch.bmm(o_lat.to(w_uv_t.dtype).transpose(0, 1), w_uv_t).transpose(0, 1)

    def _naive(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, cached: int
    ) -> torch.Tensor:
        """One sequence: q [T, H, *] over latent [L, C+R] with L = cached + T. Returns [T, H, V]."""
        t, length = q_nope.shape[0], latent.shape[0]
        c_kv, k_pe = latent.split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(c_kv).view(length, self.n_heads, self.nope_dim + self.v_dim)  # [L, H, N+V]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(length, self.n_heads, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # [T, H, N+R]
        widen = q.shape[-1] - self.v_dim if not q.is_cuda else 0
        if widen > 0:  # one head dim for q, k, v: torch's flash CPU kernel (2-4x at 2K tokens), not
            v = F.pad(v, (0, widen))  # the math path that materializes every [H, T, L] score
        # query i sits at position cached + i and sees keys 0..cached + i: plain causal without a cache
        mask = None if cached == 0 else torch.ones(t, length, dtype=torch.bool, device=q.device).tril(cached)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
        )  # [H, T, V (+ widen)]
        return o.transpose(0, 1)[..., : self.v_dim]

    def _absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latents: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        """Decode: one query per sequence. q [B, H, *], latents [B, L, C+R], padding [B, 1, L] (True
        past each sequence's context). -> [B, H, V]."""
        q_lat = self._absorb_query(q_nope)  # [B, H, C]: W_UK absorbed
        q_full = torch.cat([q_lat, q_pe], dim=-1)  # [B, H, C+R], MQA query against [c_KV ; k_pe]
        if slow_16bit(latents.dtype, latents.device):  # AVX2: bf16 bmm over the context is ~50x fp32's
            q_full, latents = q_full.float(), latents.float()
        scores = torch.bmm(q_full, latents.transpose(1, 2)).float() * self.scale  # [B, H, L]
        scores = scores.masked_fill(padding, float("-inf"))
        probs = scores.softmax(dim=-1).to(latents.dtype)
        o_lat = torch.bmm(probs, latents[..., : self.kv_rank])  # [B, H, C]
        return self._apply_w_uv(o_lat)  # [B, H, V]: W_UV applied after

    def _absorbed_paged(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        cache: PagedLatentCache,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        splits: int,
    ) -> torch.Tensor:
        """Decode straight from the paged cache: q [B, H, *], block_tables [B, nb], context_lens [B].
        -> [B, H, V]."""
        w_uk, w_uv_t = self._absorbed_weights()
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, C]: W_UK absorbed
        q_full = torch.cat([q_lat, q_pe], dim=-1)  # [B, H, C+R]
        decode = paged_mla_decode_for(q_full.device)
        o_lat = decode(
            q_full, cache.layers[self.layer], block_tables, context_lens, self.scale, self.kv_rank, splits
        )
        return torch.bmm(o_lat.transpose(0, 1), w_uv_t).transpose(0, 1)  # [B, H, V]: W_UV applied after

    def _absorbed_in_place(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: PagedLatentCache, batch: ForwardBatch
    ) -> torch.Tensor:
        """The CPU's eager decode over an fp32 cache: the AVX2 attention kernel reads the blocks in
        place; W_UK / W_UV are bf16 rows in a widened layer. q [B, H, *] -> [B, H, V]."""
        q_full = torch.cat([self._absorb_query(q_nope), q_pe], dim=-1)  # [B, H, C+R]
        o_lat = paged_mla_decode_cpu(
            q_full,
            cache.layers[self.layer],
            batch.decode_block_tables,
            batch.decode_context,
            self.scale,
            self.kv_rank,
        )
        return self._apply_w_uv(o_lat)
