"""Checks of the paged MLA decode kernels against written-out attention and MLA's naive path, by
named case: block-table holes, contexts that are not multiples of the block size, one-token
contexts, splits over the sequence, YaRN's mscale in the softmax scale. Run on CPU tensors in the
interpreter child (test_mla_decode.py) and on CUDA (tests/gpu/test_cuda_kernels.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from builders import tiny_config

from moeserve.workers.kernels.mla_decode import paged_mla_decode, paged_mla_decode_torch
from moeserve.workers.model.mla import MLA

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    contexts: tuple[int, ...]
    block_size: int = 16
    heads: int = 4
    latent: int = 32
    rope: int = 16
    splits: int = 1


CASES = {
    "one-token context": Case((1,)),
    "contexts around block edges": Case((15, 16, 17, 33), heads=3, rope=8),
    "split over the sequence": Case((70, 5), splits=4),
    "more splits than tiles": Case((20,), splits=6, block_size=8),
    "wide latent, 16+ heads": Case((40, 9), heads=20, latent=64, splits=2),
}


def paged_inputs(
    case: Case, dtype: torch.dtype, gen: torch.Generator, garbage: float = float("nan")
) -> tuple[torch.Tensor, ...]:
    """A cache whose blocks are scattered (holes between a sequence's blocks), every block no
    sequence uses and every table entry past a context pointing at NaN rows: a kernel that reads
    anything outside the contexts returns NaN. (The torch form gathers whole blocks and masks the
    scores, as the eager path does, so it gets large finite garbage instead.)"""
    width = case.latent + case.rope
    needed = [-(-n // case.block_size) for n in case.contexts]
    num_blocks = 2 * sum(needed) + 2
    cache = torch.full((num_blocks, case.block_size, width), garbage)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = torch.zeros(len(case.contexts), max(needed) + 1, dtype=torch.long)  # one extra entry
    nan_block = free.pop()
    for i, (n, nb) in enumerate(zip(case.contexts, needed, strict=True)):
        blocks = [free.pop(0) for _ in range(nb)]
        free = free[1:]  # skip one: a hole between this sequence's blocks and the next one's
        tables[i] = torch.tensor(blocks + [nan_block] * (tables.shape[1] - nb))
        rows = torch.randn(nb * case.block_size, width, generator=gen)
        rows[n:] = garbage  # the rest of the last block is not context either
        cache[blocks] = rows.view(nb, case.block_size, width)
    q = torch.randn(len(case.contexts), case.heads, width, generator=gen)
    return q.to(dtype), cache.to(dtype), tables, torch.tensor(case.contexts)


def reference(q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, contexts: torch.Tensor,
              scale: float, latent: int) -> torch.Tensor:  # fmt: skip
    """softmax(q · rows^T · scale) · rows[:, :C] per sequence, in fp64 over the gathered rows."""
    out = []
    for i, n in enumerate(contexts.tolist()):
        rows = cache[tables[i]].reshape(-1, cache.shape[-1])[:n].double()
        probs = (q[i].double() @ rows.t() * scale).softmax(dim=-1)  # [H, L]
        out.append(probs @ rows[:, :latent])
    return torch.stack(out)


def check_matches_reference(name: str, dtype_name: str, device: str, impl: str = "triton") -> None:
    case, dtype = CASES[name], DTYPES[dtype_name]
    garbage = float("nan") if impl == "triton" else 3e4
    q, cache, tables, contexts = paged_inputs(case, dtype, torch.Generator().manual_seed(len(name)), garbage)
    scale = 0.37
    decode = paged_mla_decode if impl == "triton" else paged_mla_decode_torch
    got = decode(
        q.to(device),
        cache.to(device),
        tables.to(device),
        contexts.to(device),
        scale,
        case.latent,
        case.splits,
    ).cpu()
    expected = reference(q, cache, tables, contexts, scale, case.latent)
    assert got.shape == expected.shape and got.dtype == dtype, (got.shape, got.dtype)
    assert torch.isfinite(got).all(), f"{name}: read rows outside the contexts"
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: probabilities and output round to bf16
    err = (got.double() - expected).abs().max().item()
    assert err <= tol, f"{name} {dtype_name} on {device}: max error {err:.3g} > {tol:.3g}"


def yarn_mla(dtype: torch.dtype, gen: torch.Generator) -> MLA:
    cfg = tiny_config(
        hidden_size=64, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, max_position_embeddings=4096,
        rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=128, beta_fast=32,
                          beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
    )  # fmt: skip
    assert cfg.softmax_scale != cfg.qk_head_dim**-0.5  # the mscale correction is in play
    mla = MLA(cfg, 0)
    with torch.no_grad():
        for p in mla.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return mla.to(dtype)


def check_matches_naive_mla(dtype_name: str, device: str) -> None:
    """The absorbed kernel (W_UK folded into q, W_UV after) equals MLA's naive, expanded attention
    for a decode token, with YaRN's mscale softmax scale."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(5)
    mla = yarn_mla(dtype, gen)
    case = Case((37, 1, 16), heads=4, latent=32, rope=16, splits=2)
    _, cache, tables, contexts = paged_inputs(case, dtype, gen)
    b, h = len(case.contexts), case.heads
    q_nope = torch.randn(b, h, mla.nope_dim, generator=gen).to(dtype)
    q_pe = torch.randn(b, h, mla.rope_dim, generator=gen).to(dtype)
    w_uk, w_uv_t = mla._absorbed_weights()  # [H, N, C], [H, C, V]
    q = torch.cat([torch.einsum("bhn,hnc->bhc", q_nope, w_uk), q_pe], dim=-1)  # [B, H, C+R]
    o_lat = paged_mla_decode(
        q.to(device), cache.to(device), tables.to(device), contexts.to(device), mla.scale, mla.kv_rank, 2
    ).cpu()
    got = torch.einsum("bhc,hcv->bhv", o_lat, w_uv_t)  # [B, H, V]
    for i, n in enumerate(case.contexts):
        latent = cache[tables[i]].reshape(-1, cache.shape[-1])[:n]
        expected = mla._naive(q_nope[i : i + 1], q_pe[i : i + 1], latent, n - 1)[0]  # [H, V]
        scale = expected.float().abs().max().item()
        tol = 1e-5 * scale if dtype == torch.float32 else 3e-2 * scale
        err = (got[i].float() - expected.float()).abs().max().item()
        assert err <= tol, f"sequence {i} ({n} tokens) {dtype_name} on {device}: error {err:.3g} > {tol:.3g}"
