"""The `moeserve-operator` console script: check the operator extra is installed, then run it.

`moeserve.operator.main` imports kopf at module level; importing it without `moeserve[operator]` would
end in a traceback, so this entry point checks first and prints one line instead (exit code 2).
"""

from __future__ import annotations

from collections.abc import Sequence

from moeserve import extras


def main(argv: Sequence[str] | None = None) -> int:
    extras.require_or_exit(extras.OPERATOR, "moeserve-operator", "moeserve-operator")
    from moeserve.operator.main import main as run_operator

    return run_operator(argv)
