#!/usr/bin/env bash
# CI preparation for the k8s test tier on a fresh Debian machine: install kubectl and the Python
# packages the fixture needs when they are missing, then build the control-plane binaries (cached by
# tests/controlplane/build.sh, so a machine that built them once only checks the cache).
#
# It runs no tests; .ci/run calls it before pytest. Needs root for apt-get, as CI runs here.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! command -v kubectl >/dev/null; then
    echo "ci.sh: installing kubectl"
    apt-get update -qq
    apt-get install -y -qq kubectl
fi

[[ -x /usr/local/go/bin/go ]] && PATH="/usr/local/go/bin:$PATH"
if ! command -v go >/dev/null; then
    # Debian bookworm's golang-go (1.19) predates toolchain switching, so it cannot fetch the Go that
    # go.mod needs; the machine image ships Go in /usr/local/go.
    echo "ci.sh: no go command found (expected /usr/local/go/bin/go, Go >= 1.21)" >&2
    exit 1
fi

if ! python3 -c "import kubernetes, cryptography" 2>/dev/null; then
    echo "ci.sh: installing the kubernetes and cryptography Python packages"
    python3 -m pip install -q kubernetes cryptography
fi

bash "$HERE/build.sh"
