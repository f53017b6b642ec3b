"""pytest plugin for the `gpu` tier on a bare GPU machine (used by device_check.py with --noconftest).

The root tests/conftest.py fails any run that lacks the other tiers' packages (Ray, Kopf, the
Kubernetes client, ...), which a bare GPU machine does not have and cannot fetch. The gpu tier needs
none of them, so device_check.py runs it without conftest files and loads this plugin instead: the
same import paths and the root conftest's own fixtures (imported, not copied), without its
prerequisite hook.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "kernels")]

# the root conftest as a plain module (its pytest_configure hook is not registered from here)
_spec = importlib.util.spec_from_file_location("moeserve_tests_conftest", TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)

reference_checkpoints = _root.reference_checkpoints
reference_models = _root.reference_models
