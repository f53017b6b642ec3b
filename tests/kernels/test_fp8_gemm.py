"""Block-fp8 kernels (Triton) against the naive dequantize-then-multiply references under Triton's
interpreter: the dense GEMM, the exact e4m3 decode, and the fused MoE kernels with fp8 experts
(and their torch form). The same checks run on CUDA in the gpu tier."""

from __future__ import annotations

import pytest
from fp8_checks import (
    DTYPES,
    GEMM_CASES,
    MOE_CASES,
    check_every_e4m3_pattern_decodes_exactly,
    check_fp8_gemm_matches_naive,
    check_fused_moe_fp8_matches_naive,
)
from interpreter import Interpreter

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", GEMM_CASES)
def test_fp8_gemm_matches_naive_on_the_interpreter(interpreter: Interpreter, name: str, dtype: str) -> None:
    interpreter.run(check_fp8_gemm_matches_naive, name, dtype, "cpu")


def test_every_e4m3_pattern_decodes_exactly_on_the_interpreter(interpreter: Interpreter) -> None:
    interpreter.run(check_every_e4m3_pattern_decodes_exactly, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MOE_CASES)
def test_fused_moe_with_fp8_experts_matches_naive_on_the_interpreter(
    interpreter: Interpreter, name: str, dtype: str
) -> None:
    interpreter.run(check_fused_moe_fp8_matches_naive, name, dtype, "cpu")


@pytest.mark.parametrize("name", MOE_CASES)
def test_torch_form_with_fp8_experts_matches_naive(name: str) -> None:
    check_fused_moe_fp8_matches_naive(name, "fp32", "cpu", impl="torch")
