#!/usr/bin/env bash
# CI preparation for the k8s and e2e test tiers on a fresh Debian 12 machine: install the Debian
# packages and the Python packages the fixtures need when they are missing, then build (each cached
# by content hash, so a machine that built them once only checks the caches):
#   - the control plane (build.sh) and then the real node's kubelet, kube-proxy, CoreDNS
#     (build.sh --node): compiling, one after the other, on all cores;
#   - meanwhile the images (images.sh): pause, a debootstrap'ed Debian base, the project's image
#     from its Dockerfile. That is mostly downloading and unpacking, so it overlaps the compiler.
#
# It runs no tests; tests/run.sh calls it before pytest. Needs root for apt-get, as CI runs here.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
START="$(date +%s)"

# kubectl for both tiers; the rest is the real node (e2e): container runtime, CNI plugins, the
# tools kube-proxy (nftables mode) and the CNI portmap plugin call, and the image builders.
DEBIAN_PACKAGES=(kubectl containerd runc containernetworking-plugins nftables iptables conntrack
    buildah debootstrap)
missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$package")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "ci.sh: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
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

# The images need the k8s.io/kubernetes module (pause.c) before the compiler has fetched it.
(cd "$HERE/node" && go mod download k8s.io/kubernetes)

bash "$HERE/images.sh" > >(sed -u 's/^/[images] /') 2>&1 &
images=$!
status=0
bash "$HERE/build.sh" && bash "$HERE/build.sh" --node || status=$?
# An image build is mostly downloads (torch, ray): when it fails, say so and let the other tiers run;
# the e2e tests then fail, each naming the missing image and `bash tests/controlplane/images.sh`.
if ! wait "$images"; then
    echo "ci.sh: ERROR: building the images failed (see [images] above); the e2e tier will fail" >&2
fi
echo "ci.sh: done in $(($(date +%s) - START)) s"
exit "$status"
