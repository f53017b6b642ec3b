"""Paged MLA decode kernels (Triton) against written-out attention and MLA's naive path under
Triton's interpreter, and their torch form. The same checks run on CUDA in the gpu tier."""

from __future__ import annotations

import pytest
from interpreter import Interpreter
from mla_checks import CASES, DTYPES, check_matches_naive_mla, check_matches_reference

from moeserve.workers.kernels.mla_decode import num_splits

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_paged_decode_matches_reference_on_the_interpreter(
    interpreter: Interpreter, name: str, dtype: str
) -> None:
    interpreter.run(check_matches_reference, name, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_torch_form_of_the_kernels_matches_reference(name: str, dtype: str) -> None:
    """The sync-free torch form that devices without the kernels use in the static decode step."""
    check_matches_reference(name, dtype, "cpu", impl="torch")


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_matches_naive_mla_on_the_interpreter(interpreter: Interpreter, dtype: str) -> None:
    interpreter.run(check_matches_naive_mla, dtype, "cpu")


def test_splits_fill_the_gpu_but_never_exceed_the_context() -> None:
    assert num_splits(1, 16, 4096) == 32  # batch 1: the context is cut to fill the SMs
    assert num_splits(256, 16, 4096) == 2
    assert num_splits(1, 16, 40) == 2  # never splits shorter than one tile of rows
    assert num_splits(512, 128, 4096) == 1
