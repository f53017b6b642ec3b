"""Checks of the block-fp8 Triton kernels against the naive dequantize-then-multiply references,
by named case. The tests run them on CPU tensors in the interpreter child (test_fp8_gemm.py) and on
CUDA (tests/gpu/test_cuda_kernels.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moe_checks import routing

from moeserve.workers.kernels.fp8_gemm import fp8_block_linear
from moeserve.workers.kernels.fused_moe import TileConfig, fused_moe, fused_moe_torch
from moeserve.workers.model import fp8
from moeserve.workers.model.moe import RoutedExperts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class GemmCase:
    m: int
    n: int
    k: int
    block: tuple[int, int] = (128, 128)
    parts: int = 1
    tiles: tuple[int, int, int] | None = None


GEMM_CASES = {
    "decode row, partial blocks": GemmCase(1, 200, 160),
    "batch, partial blocks": GemmCase(19, 136, 300),
    # gate ; up of 80 rows each: the second half's grid starts at row 80, inside a 128-row tile
    "two parts on their own grids": GemmCase(5, 160, 160, parts=2),
    # 32x16 blocks under 64x64 tiles: every tile spans several scale blocks
    "tiles span several blocks": GemmCase(33, 96, 80, block=(32, 16), tiles=(16, 64, 64)),
    "blocks span several tiles": GemmCase(3, 256, 256, tiles=(16, 32, 32)),
}


@dataclass(frozen=True)
class MoeCase:
    tokens: int
    dim: int
    inter: int
    block: tuple[int, int] = (128, 128)
    experts: int = 8
    top_k: int = 2
    routing: str = "random"
    tiles: TileConfig | None = None


MOE_CASES = {
    "one token, partial blocks": MoeCase(1, 160, 80, top_k=3),
    "batch, partial blocks": MoeCase(13, 160, 80),
    "small blocks across tiles": MoeCase(11, 48, 40, block=(16, 32), tiles=TileConfig(16, 32, 32)),
    "foreign pairs (expert rank)": MoeCase(9, 160, 80, routing="foreign"),
}


def _quantized(
    rows: int, cols: int, block: tuple[int, int], parts: int, gen: torch.Generator
) -> fp8.BlockFp8:
    halves = [
        fp8.quantize(torch.randn(rows // parts, cols, generator=gen) * 0.2, block) for _ in range(parts)
    ]
    weight = torch.cat([h.weight for h in halves])
    return fp8.BlockFp8(weight, torch.cat([h.scale_inv for h in halves]), block, parts)


def _tolerance(expected: torch.Tensor, dtype: torch.dtype) -> float:
    scale = expected.float().abs().max().item()
    return 1e-5 * scale if dtype == torch.float32 else 2**-6 * scale  # bf16: about two ulps of the max


def check_fp8_gemm_matches_naive(name: str, dtype_name: str, device: str) -> None:
    case, dtype = GEMM_CASES[name], DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(len(name))
    w = _quantized(case.n, case.k, case.block, case.parts, gen)
    x = torch.randn(case.m, case.k, generator=gen).to(dtype)
    expected = fp8.linear_naive(x, w)
    got = fp8_block_linear(
        x.to(device), w.weight.to(device), w.scale_inv.to(device), case.block, case.parts, case.tiles
    ).cpu()
    assert got.shape == expected.shape and got.dtype == dtype, (got.shape, got.dtype)
    err, tol = (got.float() - expected.float()).abs().max().item(), _tolerance(expected, dtype)
    assert err <= tol, f"{name} {dtype_name} on {device}: max error {err:.3g} > {tol:.3g}"


def check_every_e4m3_pattern_decodes_exactly(device: str) -> None:
    """All 254 finite float8_e4m3fn patterns (subnormals, both zeros) through the GEMM with x = I."""
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    bits[bits == 0x7F] = 0  # the two NaN patterns
    bits[bits == 0xFF] = 0
    weight = bits.view(torch.float8_e4m3fn).view(2, 128)  # [N=2, K=128]
    scale = torch.ones(1, 1)
    got = fp8_block_linear(torch.eye(128).to(device), weight.to(device), scale.to(device), (128, 128)).cpu()
    assert torch.equal(got.t(), weight.float()), (got.t() - weight.float()).abs().max()


def fp8_experts(case: MoeCase, gen: torch.Generator, dtype: torch.dtype) -> RoutedExperts:
    experts = RoutedExperts(
        case.dim, case.inter, list(range(case.experts)), dtype=dtype, fp8_block=case.block
    )
    assert experts.w13_scale_inv is not None and experts.w2_scale_inv is not None
    with torch.no_grad():
        for e in range(case.experts):
            w13 = _quantized(2 * case.inter, case.dim, case.block, 2, gen)
            w2 = _quantized(case.dim, case.inter, case.block, 1, gen)
            experts.w13[e], experts.w13_scale_inv[e] = w13.weight, w13.scale_inv
            experts.w2[e], experts.w2_scale_inv[e] = w2.weight, w2.scale_inv
    return experts


def check_fused_moe_fp8_matches_naive(name: str, dtype_name: str, device: str, impl: str = "triton") -> None:
    case, dtype = MOE_CASES[name], DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(len(name))
    experts = fp8_experts(case, gen, dtype)
    x = torch.randn(case.tokens, case.dim, generator=gen).to(dtype)
    ids = routing(case, gen)  # type: ignore[arg-type]
    weights = torch.rand(case.tokens, case.top_k, generator=gen) + 0.1
    hosted = ids < case.experts
    expected = experts.forward_naive(x, torch.where(hosted, ids, 0), torch.where(hosted, weights, 0.0))
    experts = experts.to(device)
    scales = experts.fused_scales()
    inputs = [t.to(device) for t in (x, experts.w13.detach(), experts.w2.detach(), ids, weights)]
    if impl == "triton":
        got = fused_moe(*inputs, foreign=case.routing == "foreign", config=case.tiles, **scales).cpu()  # type: ignore[arg-type]
    else:
        got = fused_moe_torch(*inputs, block_m=case.tiles.block_m if case.tiles else 16, **scales).cpu()  # type: ignore[arg-type]
    assert got.shape == expected.shape and got.dtype == dtype, (got.shape, got.dtype)
    err, tol = (got.float() - expected.float()).abs().max().item(), _tolerance(expected, dtype)
    assert err <= tol, f"{name} {dtype_name} on {device}: max error {err:.3g} > {tol:.3g}"
