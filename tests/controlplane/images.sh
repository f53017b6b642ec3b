#!/usr/bin/env bash
# Build the container images the real node runs, once per content hash, with Debian's buildah:
#
#   pause     the sandbox image: kubernetes' own build/pause/linux/pause.c (from the k8s.io/kubernetes
#             module pinned in node/go.mod), compiled with `cc -static`, alone in an image.
#   base      Debian bookworm made by debootstrap (minbase + python3, python3-venv, and gcc +
#             python3-dev for the AVX2 kernels setup.py compiles): the image of the
#             node's plain test pods and the BASE of the project's image.
#   moeserve  the repository's Dockerfile, built with --build-arg BASE=<the base image>; tagged by
#             the hash of everything that goes into it (Dockerfile, .dockerignore, pyproject.toml,
#             README.md, protos/, workers/, operator/, the base), so an unchanged checkout never
#             rebuilds. `buildah bud --layers` keeps the dependency layer (keyed on pyproject.toml),
#             so a code-only change reinstalls only moeserve itself, not torch and ray.
#
# Each image ends up in an OCI image layout (a directory) with uncompressed layers under
# ${XDG_CACHE_HOME:-~/.cache}/moeserve/images/<name>/: compressing a few GB of torch on 2 cores would
# cost minutes, and a layer the directory already holds is not written again, so after a code-only
# change only the small top layers are. The directory holds only the current build (older refs and
# their unshared blobs are pruned). The test cluster streams it into its containerd
# (`tar | ctr -n k8s.io images import -`: blobs and snapshots it already has are skipped) when
# containerd does not hold the ref yet.
# No registry is involved: none is reachable, and none is needed.
#
# Usage: bash tests/controlplane/images.sh [--print-refs | pause | base | moeserve ...]
#   (no argument)  build whatever is missing of all three
#   --print-refs   print a JSON object {name: {"ref": ..., "layout": ...}} for this checkout, and exit
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/moeserve/images"
[[ -x /usr/local/go/bin/go ]] && PATH="/usr/local/go/bin:$PATH"
export BUILDAH_ISOLATION=chroot

# What goes into the base image; changing it changes the base's hash (and so the moeserve image's).
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=http://deb.debian.org/debian
BASE_PACKAGES=python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates,passwd
# The moeserve image's inputs besides the base.
IMAGE_INPUTS=(Dockerfile .dockerignore pyproject.toml setup.py README.md protos workers operator)

log() { echo "images: [$(($(date +%s) - START))s] $*"; }
START="$(date +%s)"

short_hash() { sha256sum | cut -c1-16; }

pause_source() {
    local dir
    dir="$(cd "$HERE/node" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
    echo "$dir/build/pause/linux/pause.c"
}

pause_hash() {
    { cat "$(pause_source)"; cc --version | head -1; echo static; } | short_hash
}

base_hash() {
    echo "debootstrap --variant=minbase --include=$BASE_PACKAGES $DEBIAN_SUITE $DEBIAN_MIRROR v1" | short_hash
}

# Content of every file that goes into the image, in a stable order (tracked and untracked files that
# git does not ignore, so an uncommitted edit counts too).
moeserve_hash() {
    {
        echo "base $(base_hash)"
        cd "$REPO"
        git ls-files -z --cached --others --exclude-standard -- "${IMAGE_INPUTS[@]}" \
            | sort -z | xargs -0 -r sha256sum -- 2>/dev/null || true
    } | short_hash
}

ref_of() {
    case "$1" in
        pause) echo "localhost/moeserve/pause:$(pause_hash)" ;;
        base) echo "localhost/moeserve/base:$(base_hash)" ;;
        moeserve) echo "localhost/moeserve/moeserve:$(moeserve_hash)" ;;
    esac
}

layout_of() {
    local name="${1#localhost/moeserve/}"
    echo "$CACHE/${name%%:*}"
}

# Whether the layout's index.json names `ref`.
layout_has() {
    python3 - "$1" "$2" <<'PY'
import json, sys
try:
    index = json.load(open(f"{sys.argv[1]}/index.json"))
except OSError:
    sys.exit(1)
names = [m.get("annotations", {}).get("org.opencontainers.image.ref.name") for m in index["manifests"]]
sys.exit(0 if sys.argv[2] in names else 1)
PY
}

# Keep only `ref` in the layout's index and delete the blobs nothing reachable from it uses.
prune_layout() {
    python3 - "$1" "$2" <<'PY'
import json, os, sys
root, ref = sys.argv[1], sys.argv[2]
index_path = f"{root}/index.json"
index = json.load(open(index_path))
index["manifests"] = [
    m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref
]
def blob(digest):
    return f"{root}/blobs/{digest.replace(':', '/')}"
keep = set()
for m in index["manifests"]:
    keep.add(m["digest"])
    manifest = json.load(open(blob(m["digest"])))
    keep.add(manifest["config"]["digest"])
    keep.update(layer["digest"] for layer in manifest["layers"])
with open(index_path + ".new", "w") as out:
    json.dump(index, out)
os.replace(index_path + ".new", index_path)
for algo in os.listdir(f"{root}/blobs"):
    for name in os.listdir(f"{root}/blobs/{algo}"):
        if f"{algo}:{name}" not in keep:
            os.unlink(f"{root}/blobs/{algo}/{name}")
PY
}

print_refs() {
    local name ref sep=""
    printf '{'
    for name in pause base moeserve; do
        ref="$(ref_of "$name")"
        printf '%s"%s": {"ref": "%s", "layout": "%s"}' "$sep" "$name" "$ref" "$(layout_of "$ref")"
        sep=", "
    done
    printf '}\n'
}

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# Write (the missing blobs of) the image into its OCI layout, then drop what older builds left there
# and older builds of the same image in buildah's storage (the layers this one shares with them stay:
# they are the build cache).
export_layout() {
    local ref="$1" layout old
    layout="$(layout_of "$ref")"
    log "exporting $ref to $layout"
    buildah push --quiet --disable-compression "$ref" "oci:$layout:$ref" >/dev/null
    prune_layout "$layout" "$ref"
    for old in $(buildah images --format '{{.Name}}:{{.Tag}}' | grep "^${ref%:*}:" | grep -vx "$ref" || true); do
        buildah rmi "$old" >/dev/null 2>&1 || true
    done
}

build_pause() {
    local ref="$1" work ctr
    work="$(mktemp -d)"
    log "compiling $(pause_source) (cc -static)"
    cc -static -Os -Wall -Werror -DVERSION="moeserve-$(pause_hash)" -o "$work/pause" "$(pause_source)"
    ctr="$(buildah from scratch)"
    buildah copy --quiet "$ctr" "$work/pause" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
    buildah commit --quiet --rm "$ctr" "$ref" >/dev/null
    rm -rf "$work"
}

build_base() {
    local ref="$1" work ctr
    work="$(mktemp -d /var/tmp/moeserve-base.XXXXXX)"
    log "debootstrap $DEBIAN_SUITE (minbase + $BASE_PACKAGES) from $DEBIAN_MIRROR"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$DEBIAN_SUITE" "$work/rootfs" "$DEBIAN_MIRROR" \
        >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; return 1; }
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"* \
        "$work/rootfs/debootstrap"
    tar -C "$work/rootfs" --numeric-owner -cf "$work/rootfs.tar" .
    ctr="$(buildah from scratch)"
    buildah add --quiet "$ctr" "$work/rootfs.tar" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd '["/bin/bash"]' "$ctr"
    buildah commit --quiet --rm "$ctr" "$ref" >/dev/null
    rm -rf "$work"
}

# The host's pip settings that reach PyPI from here (a CA bundle for a TLS-inspecting proxy, an index
# URL), as a pip.conf mounted into each RUN of the build only: they never land in the image.
host_pip_mounts() {
    local work="$1" cert index conf="$work/pip.conf"
    cert="$(python3 -m pip config get global.cert 2>/dev/null || true)"
    cert="${PIP_CERT:-$cert}"
    index="$(python3 -m pip config get global.index-url 2>/dev/null || true)"
    index="${PIP_INDEX_URL:-$index}"
    echo "[global]" >"$conf"
    [[ -n "$index" ]] && echo "index-url = $index" >>"$conf"
    [[ -n "${PIP_DEFAULT_TIMEOUT:-}" ]] && echo "timeout = $PIP_DEFAULT_TIMEOUT" >>"$conf"
    if [[ -n "$cert" && -f "$cert" ]]; then
        cp "$cert" "$work/host-ca.crt"
        echo "cert = /etc/moeserve-build-ca.crt" >>"$conf"
        echo "-v $work/host-ca.crt:/etc/moeserve-build-ca.crt:ro"
    fi
    echo "-v $conf:/etc/pip.conf:ro"
}

build_moeserve() {
    local ref="$1" work mounts
    work="$(mktemp -d)"
    # shellcheck disable=SC2207
    mounts=($(host_pip_mounts "$work"))
    log "buildah bud $REPO/Dockerfile with BASE=$(ref_of base)"
    (cd "$REPO" && buildah bud --layers --quiet --network host "${mounts[@]}" \
        --build-arg "BASE=$(ref_of base)" -f Dockerfile -t "$ref" .)
    rm -rf "$work"
}

ensure() {
    local name="$1" ref layout step
    ref="$(ref_of "$name")"
    layout="$(layout_of "$ref")"
    if layout_has "$layout" "$ref"; then
        log "$name up to date: $ref in $layout"
        return
    fi
    [[ "$name" == moeserve ]] && ensure base
    step="$(date +%s)"
    if ! have_image "$ref"; then
        "build_$name" "$ref"
    fi
    export_layout "$ref"
    log "$name ready in $(($(date +%s) - step))s: $ref"
}

main() {
    if [[ "${1:-}" == "--print-refs" ]]; then
        print_refs
        exit 0
    fi
    mkdir -p "$CACHE"
    exec 9>"$CACHE/build.lock"
    flock 9
    local names=("$@")
    [[ ${#names[@]} -gt 0 ]] || names=(pause base moeserve)
    local name
    for name in "${names[@]}"; do
        case "$name" in
            pause | base | moeserve) ensure "$name" ;;
            *) echo "usage: images.sh [--print-refs | pause | base | moeserve ...]" >&2; exit 2 ;;
        esac
    done
}

main "$@"
