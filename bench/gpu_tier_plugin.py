"""pytest plugin for the `gpu` tier on a bare GPU machine (used by device_check.py with --noconftest).

The root tests/conftest.py fails any run that lacks the other tiers' packages (Ray, Kopf, the
Kubernetes client, ...), which a bare GPU machine does not have and cannot fetch. The gpu tier needs
none of them, so device_check.py runs it without conftest files and loads this plugin instead: the
same import paths and the root conftest's own fixtures (imported, not copied), without its
prerequisite hook.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "kernels")]

from conftest import reference_checkpoints, reference_models  # noqa: E402

__all__ = ["reference_checkpoints", "reference_models"]
