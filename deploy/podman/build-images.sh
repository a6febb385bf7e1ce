#!/usr/bin/env bash
# Build the images the podman test (tests/deploy/test_compose_podman.py) runs, on a machine
# with podman + runc but no image registry: every base image is made from Debian packages.
#
#   bash deploy/podman/build-images.sh            (as root; apt-get install podman runc debootstrap)
#
# localhost/debian-python:bookworm   debootstrap minbase + python3, python3-venv, tini (kept: built once)
# localhost/voxserve-prometheus:2.42 debootstrap minbase + Debian's prometheus (kept: built once)
# localhost/voxserve-haproxy:2.6     debootstrap minbase + Debian's haproxy (kept: built once)
# localhost/voxserve:podman-test     deploy/Dockerfile on the first one (rebuilt each run; podman's
#                                    layer cache keeps torch and the dependencies, so only
#                                    `pip install .` and the final copy run again)
#
# MIRROR (default: the first URI of this machine's apt sources) is the only address the builds
# reach besides pip's configured index; PIP_FIND_LINKS and SSL_CERT_FILE/PIP_CERT are passed
# into the build stage when set. What a rebuild replaced is pruned, so disk use stays bounded
# (about 6 GB of images).
set -euo pipefail
cd "$(dirname "$0")/../.."

PODMAN=(podman --runtime runc)
BASE=localhost/debian-python:bookworm
PROM=localhost/voxserve-prometheus:2.42
HAPROXY=localhost/voxserve-haproxy:2.6
IMAGE=${VOXSERVE_TEST_IMAGE:-localhost/voxserve:podman-test}
WORK=${VOXSERVE_PODMAN_WORK:-/var/tmp/voxserve-podman}

mirror() {
    if [[ -n "${MIRROR:-}" ]]; then echo "$MIRROR"; return; fi
    local uri
    uri=$(grep -h -m1 -E '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | head -1 | awk '{ if ($1 == "URIs:") print $2; else for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }')
    echo "${uri:-http://deb.debian.org/debian}"
}

have_image() { "${PODMAN[@]}" image exists "$1"; }

rootfs_image() {  # rootfs_image TAG PACKAGES [--change ...]
    local tag=$1 packages=$2
    shift 2
    local root="$WORK/rootfs-${tag##*/}"
    root=${root//:/-}
    rm -rf "$root"
    mkdir -p "$WORK"
    echo "==> debootstrap $tag ($packages) from $(mirror)"
    debootstrap --variant=minbase --include="$packages" bookworm "$root" "$(mirror)" >"$root.log" 2>&1 \
        || { tail -20 "$root.log" >&2; exit 1; }
    ln -sf python3 "$root/usr/bin/python" 2>/dev/null || true
    # Prometheus' data directory (a named volume starts as a copy of it), for its user nobody.
    [[ "$packages" == prometheus* ]] && install -d -o 65534 -g 65534 "$root/prometheus"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | "${PODMAN[@]}" import "$@" - "$tag" >/dev/null
    rm -rf "$root" "$root.log"
}

command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }

have_image "$BASE" || rootfs_image "$BASE" python3,python3-venv,ca-certificates,tini,passwd
have_image "$PROM" || rootfs_image "$PROM" prometheus,ca-certificates \
    --change 'ENTRYPOINT ["/usr/bin/prometheus"]' --change 'USER nobody'
have_image "$HAPROXY" || rootfs_image "$HAPROXY" haproxy,ca-certificates --change 'USER nobody'

build=(--network host --ignorefile deploy/Dockerfile.dockerignore -f deploy/Dockerfile
    --build-arg "PYTHON_IMAGE=$BASE")
if [[ -n "${PIP_FIND_LINKS:-}" && -d "$PIP_FIND_LINKS" ]]; then
    # The local wheel folder holds torch's CPU build: no extra index needed.
    build+=(-v "$PIP_FIND_LINKS:$PIP_FIND_LINKS:ro" --build-arg "PIP_FIND_LINKS=$PIP_FIND_LINKS"
        --build-arg TORCH_INDEX_URL=)
fi
cert=${PIP_CERT:-${SSL_CERT_FILE:-}}
if [[ -n "$cert" && -f "$cert" ]]; then
    build+=(-v "$cert:$cert:ro" --build-arg "PIP_CERT=$cert")
fi
echo "==> building $IMAGE"
# The build stage is tagged too ($IMAGE-build): its layers (torch, the dependencies) stay the
# cache of the next build, and the prune below then only removes what this build replaced.
"${PODMAN[@]}" build "${build[@]}" --target build -t "$IMAGE-build" . >"$WORK.build.log" 2>&1 \
    || { tail -40 "$WORK.build.log" >&2; exit 1; }
"${PODMAN[@]}" build "${build[@]}" -t "$IMAGE" . >>"$WORK.build.log" 2>&1 || { tail -40 "$WORK.build.log" >&2; exit 1; }
"${PODMAN[@]}" image prune -f >/dev/null
echo "==> images ready: $BASE $PROM $HAPROXY $IMAGE"
