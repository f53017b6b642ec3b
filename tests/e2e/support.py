"""Helpers shared by the e2e tests and their fixtures."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

Kubectl = Callable[..., subprocess.CompletedProcess[str]]
"""`kubectl("get", "pods", timeout_s=120, check=True)`: run kubectl against the e2e cluster."""
