#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok,
# helm) from the Go module pinned in this directory, once per machine; with --node, the real node's
# binaries instead (kubelet and kube-proxy from the same k8s.io/kubernetes release, and CoreDNS), from
# the module in node/.
#
# The binaries go to ${XDG_CACHE_HOME:-$HOME/.cache}/moeserve/controlplane/<hash>/bin (control plane)
# or .../controlplane/node-<hash>/bin (node), where <hash> is taken from that module's go.mod and
# go.sum, so a version bump builds a new set and an unchanged one is reused. The node has a module of
# its own so that adding it did not change the control plane's go.sum (its cache key), CoreDNS's
# newer dependencies stay out of the control plane's build, and the two can build side by side.
# A complete cache makes this script a no-op. With MOESERVE_CONTROLPLANE_BIN (or, for --node,
# MOESERVE_NODE_BIN) set, nothing is built: the script only checks that directory.
#
# Usage: bash tests/controlplane/build.sh [--node] [--print-bin-dir]
#   --node           the real node's binaries (kubelet, kube-proxy, coredns)
#   --print-bin-dir  print the directory the binaries are (or would be) in, and exit
#
# Besides the binaries, the directory holds kwok-stages.yaml: the Stage objects (node initialize and
# heartbeat with lease, pod ready/complete/delete) copied from the pinned kwok module, which the kwok
# binary needs as --config when it runs without kwokctl.
#
# Knobs: MOESERVE_GO_BUILD_P (go build -p, default: number of cores).
# kubectl is not built here: it comes from Debian's kubectl package (see ci.sh).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KWOK_STAGES=(node/fast node/heartbeat-with-lease pod/fast)

# What this run builds: the control plane (default) or the node (--node).
SET=controlplane
MODULE_DIR="$HERE"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok helm)
OVERRIDE_VAR=MOESERVE_CONTROLPLANE_BIN
PRINT_DIR=""
for arg in "$@"; do
    case "$arg" in
        --node)
            SET=node
            MODULE_DIR="$HERE/node"
            BINARIES=(kubelet kube-proxy coredns)
            OVERRIDE_VAR=MOESERVE_NODE_BIN
            ;;
        --print-bin-dir) PRINT_DIR=1 ;;
        *) echo "usage: build.sh [--node] [--print-bin-dir]" >&2; exit 2 ;;
    esac
done

package_of() {
    case "$1" in
        etcd) echo go.etcd.io/etcd/server/v3 ;;
        kube-apiserver | kube-controller-manager | kube-scheduler | kubelet | kube-proxy) echo "k8s.io/kubernetes/cmd/$1" ;;
        coredns) echo github.com/coredns/coredns ;;
        kwok) echo sigs.k8s.io/kwok/cmd/kwok ;;
        helm) echo helm.sh/helm/v3/cmd/helm ;;
        *) echo "unknown binary $1" >&2; return 1 ;;
    esac
}

cache_bin_dir() {
    local hash
    hash="$(cat "$MODULE_DIR/go.mod" "$MODULE_DIR/go.sum" | sha256sum | cut -c1-16)"
    [[ "$SET" == node ]] && hash="node-$hash"
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/moeserve/controlplane/$hash/bin"
}

missing_in() {
    local dir="$1" name missing=()
    for name in "${BINARIES[@]}"; do
        [[ -x "$dir/$name" ]] || missing+=("$name")
    done
    [[ "$SET" == node || -f "$dir/kwok-stages.yaml" ]] || missing+=(kwok-stages.yaml)
    echo "${missing[*]:-}"
}

module_version() {
    (cd "$MODULE_DIR" && go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$1")
}

ldflags_for() {
    local name="$1" flags="-s -w" kube
    case "$name" in
        kube-*)
            # Without these the servers report v0.0.0-master, which Helm's kubeVersion checks reject.
            kube="$(module_version k8s.io/kubernetes)"
            local minor="${kube#v1.}"
            minor="${minor%%.*}"
            local v=k8s.io/component-base/version
            flags+=" -X $v.gitVersion=$kube -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
            ;;
        helm)
            flags+=" -X helm.sh/helm/v3/internal/version.version=$(module_version helm.sh/helm/v3)"
            ;;
        kubelet)
            # The node reports this as its kubeletVersion; the version skew checks read it.
            kube="$(module_version k8s.io/kubernetes)"
            local minor="${kube#v1.}"
            minor="${minor%%.*}"
            local v=k8s.io/component-base/version
            flags+=" -X $v.gitVersion=$kube -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
            ;;
    esac
    echo "$flags"
}

write_kwok_stages() {
    local out="$1" kwok_dir stage file
    kwok_dir="$(cd "$HERE" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
    for stage in "${KWOK_STAGES[@]}"; do
        for file in "$kwok_dir/kustomize/stage/$stage"/*.yaml; do
            [[ "$(basename "$file")" == kustomization.yaml ]] && continue
            echo "---"
            echo "# from sigs.k8s.io/kwok kustomize/stage/$stage/$(basename "$file")"
            cat "$file"
        done
    done >"$out"
}

elapsed() {
    local s=$(($(date +%s) - $1))
    printf '%dm%02ds' $((s / 60)) $((s % 60))
}

build_all() {
    local out="$1" start name step
    start="$(date +%s)"
    export GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
    echo "$SET: first build into $out (go $(go env GOVERSION), -p ${MOESERVE_GO_BUILD_P:-$(nproc)})"
    echo "$SET: [$(elapsed "$start")] downloading modules"
    (cd "$MODULE_DIR" && go mod download)
    for name in "${BINARIES[@]}"; do
        step="$(date +%s)"
        echo "$SET: [$(elapsed "$start")] building $name"
        (cd "$MODULE_DIR" && go build -p "${MOESERVE_GO_BUILD_P:-$(nproc)}" -trimpath \
            -ldflags="$(ldflags_for "$name")" -o "$out/$name" "$(package_of "$name")")
        echo "$SET: [$(elapsed "$start")] built $name in $(elapsed "$step")"
    done
    [[ "$SET" == node ]] || write_kwok_stages "$out/kwok-stages.yaml"
    echo "$SET: all binaries built in $(elapsed "$start")"
}

main() {
    local override="${!OVERRIDE_VAR:-}"
    if [[ -n "$override" ]]; then
        local missing
        missing="$(missing_in "$override")"
        if [[ -n "$missing" ]]; then
            echo "$SET: $OVERRIDE_VAR=$override lacks: $missing" >&2
            exit 1
        fi
        [[ -n "$PRINT_DIR" ]] && echo "$override"
        exit 0
    fi

    local bin
    bin="$(cache_bin_dir)"
    if [[ -n "$PRINT_DIR" ]]; then
        echo "$bin"
        exit 0
    fi

    mkdir -p "$(dirname "$bin")"
    # One builder at a time per cache entry; a second caller waits and then finds the cache complete.
    exec 9>"$(dirname "$bin")/build.lock"
    flock 9
    if [[ -z "$(missing_in "$bin")" ]]; then
        echo "$SET: binaries up to date in $bin"
        exit 0
    fi

    local staging
    staging="$(dirname "$bin")/bin.partial"
    rm -rf "$staging"
    mkdir -p "$staging"
    build_all "$staging"
    rm -rf "$bin"
    mv "$staging" "$bin"
    echo "$SET: binaries in $bin"
}

main "$@"
