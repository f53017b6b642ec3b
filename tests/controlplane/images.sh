#!/usr/bin/env bash
# Build the container images the real node runs, once per content hash, with Debian's buildah:
#
#   pause     the sandbox image: kubernetes' own build/pause/linux/pause.c (from the k8s.io/kubernetes
#             module pinned in node/go.mod), compiled with `cc -static`, alone in an image.
#   base      Debian bookworm made by debootstrap (minbase + python3, python3-venv): the image of the
#             node's plain test pods and the BASE of the project's image.
#   moeserve  the repository's Dockerfile, built with --build-arg BASE=<the base image>; tagged by
#             the hash of everything that goes into it (Dockerfile, .dockerignore, pyproject.toml,
#             README.md, protos/, workers/, operator/, the base), so an unchanged checkout never
#             rebuilds. `buildah bud --layers` keeps the dependency layer (keyed on pyproject.toml),
#             so a code-only change reinstalls only moeserve itself, not torch and ray.
#
# Each image ends up as an OCI archive with uncompressed layers (compressing a few GB of torch on 2
# cores would cost minutes, and the archive never leaves the machine) under
# ${XDG_CACHE_HOME:-~/.cache}/moeserve/images/, which the test cluster imports into its containerd
# (`ctr -n k8s.io images import`) when it does not hold it yet, and then deletes (a few GB less on
# disk; containerd's image store under ~/.cache/moeserve/containerd is kept as a cache).
# No registry is involved: none is reachable, and none is needed.
#
# Usage: bash tests/controlplane/images.sh [--print-refs | pause | base | moeserve ...]
#   (no argument)  build whatever is missing of all three
#   --print-refs   print a JSON object {name: {"ref": ..., "archive": ...}} for this checkout, and exit
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/moeserve/images"
IMPORTED="${XDG_CACHE_HOME:-$HOME/.cache}/moeserve/containerd/moeserve-imported"
[[ -x /usr/local/go/bin/go ]] && PATH="/usr/local/go/bin:$PATH"
export BUILDAH_ISOLATION=chroot

# What goes into the base image; changing it changes the base's hash (and so the moeserve image's).
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=http://deb.debian.org/debian
BASE_PACKAGES=python3,python3-venv,ca-certificates,passwd
# The moeserve image's inputs besides the base.
IMAGE_INPUTS=(Dockerfile .dockerignore pyproject.toml README.md protos workers operator)

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

archive_of() {
    local ref="$1"
    local name="${ref#localhost/moeserve/}"
    echo "$CACHE/${name%%:*}-${name##*:}.tar"
}

print_refs() {
    local name ref sep=""
    printf '{'
    for name in pause base moeserve; do
        ref="$(ref_of "$name")"
        printf '%s"%s": {"ref": "%s", "archive": "%s"}' "$sep" "$name" "$ref" "$(archive_of "$ref")"
        sep=", "
    done
    printf '}\n'
}

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# Write the OCI archive containerd imports, then drop older archives of the same image.
export_archive() {
    local ref="$1" archive name
    archive="$(archive_of "$ref")"
    name="$(basename "$archive")"
    log "exporting $ref to $archive"
    rm -f "$archive.partial"
    buildah push --quiet --disable-compression "$ref" "oci-archive:$archive.partial:$ref" >/dev/null
    mv "$archive.partial" "$archive"
    find "$CACHE" -maxdepth 1 -name "${name%-*}-*.tar" ! -name "$name" -delete
    # Older builds of the same image (the layers they share with this one stay, as the build cache).
    local old
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
    local name="$1" ref archive step
    ref="$(ref_of "$name")"
    archive="$(archive_of "$ref")"
    if [[ -f "$archive" ]]; then
        log "$name up to date: $archive"
        return
    fi
    # The test cluster deletes an archive once its containerd (whose image store is a cache too) holds
    # the image, and leaves this mark.
    if [[ -f "$IMPORTED/${ref//\//_}" ]]; then
        log "$name up to date: imported into the test cluster's containerd"
        return
    fi
    [[ "$name" == moeserve ]] && ensure base
    step="$(date +%s)"
    if ! have_image "$ref"; then
        "build_$name" "$ref"
    fi
    export_archive "$ref"
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
