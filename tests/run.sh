#!/usr/bin/env bash
# The one test command: install everything the tests need, then run every tier.
#
#   bash tests/run.sh [PYTEST ARGS...]      e.g. bash tests/run.sh -m unit -x
#
# 1. Python: `pip install -e ".[dev,operator,ray]"` into the active Python (a virtual environment, or
#    the machine's Python as in CI); skipped when this checkout is already installed there with the
#    same pyproject.toml, setup.py and C sources (a stamp in that environment records the checkout
#    path and their hash; the C kernels compile in place, so an edit to them reinstalls).
# 2. Binaries: tests/controlplane/ci.sh installs kubectl and the rest from Debian's packages and builds
#    the control plane (and the real node) from pinned Go modules, cached by content hash.
# 3. `python -m pytest` over all tiers; only the gpu tier skips, when no CUDA device is present.
# Idempotent: a second run goes straight to pytest. CI (.ci/run) runs exactly this, with no arguments.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

python_deps() {
    local prefix stamp want
    prefix="$("$PYTHON" -c 'import sys; print(sys.prefix)')"
    stamp="$prefix/.moeserve-test-install"
    want="$(pwd) $(cat pyproject.toml setup.py workers/kernels/csrc/*.c | sha256sum | cut -c1-16)"
    if [[ "$(cat "$stamp" 2>/dev/null || true)" == "$want" ]] \
        && "$PYTHON" -c 'import moeserve.workers, ray.serve, kopf, transformers
from moeserve.workers.kernels import avx2
assert avx2.ext is not None  # built in place: a fresh checkout at the same path has none yet' 2>/dev/null; then
        echo "tests/run.sh: Python packages up to date in $prefix"
        return
    fi
    echo "tests/run.sh: installing moeserve with its dev, operator and ray extras into $prefix"
    "$PYTHON" -m pip install -q -e ".[dev,operator,ray]"
    echo "$want" >"$stamp"
}

start="$(date +%s)"
python_deps
bash tests/controlplane/ci.sh
echo "tests/run.sh: prerequisites ready in $(($(date +%s) - start)) s"
exec "$PYTHON" -m pytest "$@"
