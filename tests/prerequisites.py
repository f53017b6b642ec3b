"""What the test suite needs installed, checked once before any test is collected.

Every tier runs in every run: a missing Python package fails the run with its name and the command
that installs it, instead of a collection error deep in one module or a silently skipped tier. Binaries
(kubectl, the control plane, the real node) are checked by the fixtures that start them, with the same
kind of message. Only the `gpu` tier skips, when no CUDA device is present.
"""

from __future__ import annotations

import importlib.util

INSTALL_ALL = 'bash tests/run.sh (or: pip install -e ".[dev,operator,ray]")'

# module -> the pyproject extra that installs it
REQUIRED_MODULES: dict[str, str] = {
    "pytest_timeout": "dev",
    "hypothesis": "dev",
    "transformers": "dev",
    "grpc_tools": "dev",
    "psutil": "dev",
    "cryptography": "dev",
    "openai": "dev",
    "kopf": "operator",
    "kubernetes": "operator",
    "urllib3": "operator",
    "ray": "ray",
    "ray.serve": "ray",
    "moeserve.workers": "none, the package itself",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def missing_modules() -> list[str]:
    return [module for module in REQUIRED_MODULES if not _installed(module)]


def missing_message(missing: list[str]) -> str:
    lines = [f"  {module}  (extra: {REQUIRED_MODULES[module]})" for module in missing]
    header = "the test suite needs Python packages that are not installed:"
    return "\n".join([header, *lines, f"install them with: {INSTALL_ALL}"])
