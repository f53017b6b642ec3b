#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok,
# helm) from the Go module pinned in this directory, once per machine.
#
# The binaries go to ${XDG_CACHE_HOME:-$HOME/.cache}/moeserve/controlplane/<hash>/bin, where <hash>
# is taken from go.mod and go.sum, so a version bump builds a new set and an unchanged one is reused.
# A complete cache makes this script a no-op. With MOESERVE_CONTROLPLANE_BIN set, nothing is built:
# the script only checks that directory.
#
# Usage: bash tests/controlplane/build.sh [--print-bin-dir]
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
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok helm)
KWOK_STAGES=(node/fast node/heartbeat-with-lease pod/fast)

package_of() {
    case "$1" in
        etcd) echo go.etcd.io/etcd/server/v3 ;;
        kube-apiserver | kube-controller-manager | kube-scheduler) echo "k8s.io/kubernetes/cmd/$1" ;;
        kwok) echo sigs.k8s.io/kwok/cmd/kwok ;;
        helm) echo helm.sh/helm/v3/cmd/helm ;;
        *) echo "unknown binary $1" >&2; return 1 ;;
    esac
}

cache_bin_dir() {
    local hash
    hash="$(cat "$HERE/go.mod" "$HERE/go.sum" | sha256sum | cut -c1-16)"
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/moeserve/controlplane/$hash/bin"
}

missing_in() {
    local dir="$1" name missing=()
    for name in "${BINARIES[@]}"; do
        [[ -x "$dir/$name" ]] || missing+=("$name")
    done
    [[ -f "$dir/kwok-stages.yaml" ]] || missing+=(kwok-stages.yaml)
    echo "${missing[*]:-}"
}

module_version() {
    (cd "$HERE" && go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$1")
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
    echo "controlplane: first build into $out (go $(go env GOVERSION), -p ${MOESERVE_GO_BUILD_P:-$(nproc)})"
    echo "controlplane: [$(elapsed "$start")] downloading modules"
    (cd "$HERE" && go mod download)
    for name in "${BINARIES[@]}"; do
        step="$(date +%s)"
        echo "controlplane: [$(elapsed "$start")] building $name"
        (cd "$HERE" && go build -p "${MOESERVE_GO_BUILD_P:-$(nproc)}" -trimpath \
            -ldflags="$(ldflags_for "$name")" -o "$out/$name" "$(package_of "$name")")
        echo "controlplane: [$(elapsed "$start")] built $name in $(elapsed "$step")"
    done
    write_kwok_stages "$out/kwok-stages.yaml"
    echo "controlplane: all binaries built in $(elapsed "$start")"
}

main() {
    if [[ -n "${MOESERVE_CONTROLPLANE_BIN:-}" ]]; then
        local missing
        missing="$(missing_in "$MOESERVE_CONTROLPLANE_BIN")"
        if [[ -n "$missing" ]]; then
            echo "controlplane: MOESERVE_CONTROLPLANE_BIN=$MOESERVE_CONTROLPLANE_BIN lacks: $missing" >&2
            exit 1
        fi
        [[ "${1:-}" == "--print-bin-dir" ]] && echo "$MOESERVE_CONTROLPLANE_BIN"
        exit 0
    fi

    local bin
    bin="$(cache_bin_dir)"
    if [[ "${1:-}" == "--print-bin-dir" ]]; then
        echo "$bin"
        exit 0
    fi

    mkdir -p "$(dirname "$bin")"
    # One builder at a time per cache entry; a second caller waits and then finds the cache complete.
    exec 9>"$(dirname "$bin")/build.lock"
    flock 9
    if [[ -z "$(missing_in "$bin")" ]]; then
        echo "controlplane: binaries up to date in $bin"
        exit 0
    fi

    local staging
    staging="$(dirname "$bin")/bin.partial"
    rm -rf "$staging"
    mkdir -p "$staging"
    build_all "$staging"
    rm -rf "$bin"
    mv "$staging" "$bin"
    echo "controlplane: binaries in $bin"
}

main "$@"
