#!/usr/bin/env bash
# A local base image for the MCloudTT images when no container registry is reachable: a minimal
# Debian bookworm root filesystem with Debian's Python 3.11 (and venv, for the builder stage),
# made with debootstrap from Debian's package mirror and imported into docker.
#
#   kind/base-image.sh [--tag TAG] [--force]
#
# Prints the tag. Cached twice: nothing is done when the daemon already has the tag, and the
# root filesystem tarball is kept under $MCLOUDTT_CACHE (default ~/.cache/mcloudtt), so a fresh
# daemon only re-imports it. Needs root and debootstrap (apt-get install debootstrap).
# Environment: DOCKER (default docker), DEBIAN_MIRROR (default https://deb.debian.org/debian).
set -euo pipefail

DOCKER=${DOCKER:-docker}
TAG=mcloudtt-base:bookworm-python3.11
FORCE=0
CACHE=${MCLOUDTT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mcloudtt}
MIRROR=${DEBIAN_MIRROR:-https://deb.debian.org/debian}
# ca-certificates: the adapter talks TLS to BigQuery; python3-venv: the builder stage's venv.
PACKAGES=python3,python3-venv,ca-certificates

while [ $# -gt 0 ]; do
    case "$1" in
        --tag)
            TAG=${2:?--tag needs a name}
            shift
            ;;
        --force) FORCE=1 ;;
        -h | --help)
            sed -n '2,11p' "$0"
            exit 0
            ;;
        *)
            echo "base-image.sh: unknown option $1" >&2
            exit 2
            ;;
    esac
    shift
done

log() { printf 'base-image.sh: %s\n' "$*" >&2; }

if [ "$FORCE" = 0 ] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG exists"
    echo "$TAG"
    exit 0
fi

# The tarball's name carries what went into it: another package list makes another tarball.
key=$(printf '%s\n' bookworm minbase "$PACKAGES" | sha256sum | cut -c1-12)
tarball=$CACHE/base/bookworm-python3.11-$key.tar
if [ "$FORCE" = 1 ] || [ ! -s "$tarball" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "base-image.sh: debootstrap needs root" >&2
        exit 1
    fi
    command -v debootstrap >/dev/null 2>&1 || {
        echo "base-image.sh: debootstrap is not installed (apt-get install debootstrap)" >&2
        exit 1
    }
    mkdir -p "$CACHE/base"
    rootfs=$(mktemp -d "$CACHE/base/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap bookworm ($PACKAGES) into $rootfs (about a minute)"
    debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" "$MIRROR" \
        >"$CACHE/base/debootstrap.log" 2>&1 || {
        tail -20 "$CACHE/base/debootstrap.log" >&2
        exit 1
    }
    # What an image never needs: package caches and lists, documentation, locales.
    rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/* "$rootfs"/tmp/*
    chmod 0755 "$rootfs" # mktemp made it 0700: it becomes the image's /
    tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi

log "importing $tarball as $TAG"
"$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$tarball" "$TAG" >/dev/null
echo "$TAG"
