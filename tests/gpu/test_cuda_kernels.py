"""The Triton kernels compiled on a CUDA device, by the same checks as the interpreter runs
(tests/kernels/*_checks.py). Skipped without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))

import fp8_checks  # noqa: E402
import mla_checks  # noqa: E402
import moe_checks  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", moe_checks.DTYPES)
@pytest.mark.parametrize("name", moe_checks.CASES)
def test_fused_moe_matches_naive_on_cuda(name: str, dtype: str) -> None:
    moe_checks.check_fused_moe_matches_naive(name, dtype, "cuda")


@pytest.mark.parametrize("dtype", fp8_checks.DTYPES)
@pytest.mark.parametrize("name", fp8_checks.GEMM_CASES)
def test_fp8_gemm_matches_naive_on_cuda(name: str, dtype: str) -> None:
    fp8_checks.check_fp8_gemm_matches_naive(name, dtype, "cuda")


def test_every_e4m3_pattern_decodes_exactly_on_cuda() -> None:
    fp8_checks.check_every_e4m3_pattern_decodes_exactly("cuda")


@pytest.mark.parametrize("dtype", fp8_checks.DTYPES)
@pytest.mark.parametrize("name", fp8_checks.MOE_CASES)
def test_fused_moe_with_fp8_experts_matches_naive_on_cuda(name: str, dtype: str) -> None:
    fp8_checks.check_fused_moe_fp8_matches_naive(name, dtype, "cuda")


@pytest.mark.parametrize("dtype", mla_checks.DTYPES)
@pytest.mark.parametrize("name", mla_checks.CASES)
def test_paged_decode_matches_reference_on_cuda(name: str, dtype: str) -> None:
    mla_checks.check_matches_reference(name, dtype, "cuda")


@pytest.mark.parametrize("dtype", mla_checks.DTYPES)
def test_paged_decode_matches_naive_mla_on_cuda(dtype: str) -> None:
    mla_checks.check_matches_naive_mla(dtype, "cuda")
