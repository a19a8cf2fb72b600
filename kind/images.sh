#!/usr/bin/env bash
# Build the MCloudTT images with no network inside the build: the Python dependencies come from a
# wheelhouse made here on the host (exactly the versions and hashes uv.lock pins, plus the
# workspace members' own wheels), and the images install from it with `pip --no-index`.
# kind/up.sh and CI (.ci/containers) build through this script.
#
#   kind/images.sh [--base auto|registry|local|IMAGE] [--tag TAG] [COMPONENT...]
#
# COMPONENTs: broker adapter simulator (default: broker adapter). --base picks the image the
# Dockerfiles build on (their BASE_IMAGE argument): `registry` the official
# python:3.11-slim-bookworm, `local` the Debian bookworm image kind/base-image.sh makes with
# debootstrap (no registry needed), `auto` (default) the official one when the daemon has it or
# can pull it, else the local one. Prints one NAME:TAG line per image built.
#
# The wheelhouse is cached under $MCLOUDTT_CACHE (default ~/.cache/mcloudtt), keyed by the
# exported requirements, and copied into build/wheelhouse/ (the only part of build/ that
# .dockerignore lets into the context). Environment: DOCKER (default docker), UV.
set -euo pipefail

cd "$(dirname "$0")/.."
DOCKER=${DOCKER:-docker}
CACHE=${MCLOUDTT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mcloudtt}
# uv as ./mcloudtt finds it: on PATH, else the one ./mcloudtt installs into .tools/.
UV=${UV:-$(command -v uv || echo .tools/bin/uv)}
REGISTRY_BASE=python:3.11-slim-bookworm
# The wheels must fit the images' interpreter: CPython 3.11 on x86_64 glibc (bookworm). Debian's
# own 3.11 when the host has it: it is the local base's (3.11.2), and environment markers such
# as `python_full_version < '3.11.3'` must be evaluated for the oldest 3.11 an image may have
# (the extra wheel is left unused where the marker is false).
HOST_PYTHON=3.11
[ -x /usr/bin/python3.11 ] && HOST_PYTHON=/usr/bin/python3.11
PIP=(tool run --python "$HOST_PYTHON" --from "pip==25.0.1" pip)
BASE=auto
TAG=dev
COMPONENTS=()

while [ $# -gt 0 ]; do
    case "$1" in
        --base)
            BASE=${2:?--base needs auto, registry, local or an image}
            shift
            ;;
        --tag)
            TAG=${2:?--tag needs a tag}
            shift
            ;;
        -h | --help)
            sed -n '2,17p' "$0"
            exit 0
            ;;
        broker | adapter | simulator) COMPONENTS+=("$1") ;;
        *)
            echo "images.sh: unknown option or component $1" >&2
            exit 2
            ;;
    esac
    shift
done
[ ${#COMPONENTS[@]} -gt 0 ] || COMPONENTS=(broker adapter)

log() { printf 'images.sh: %s\n' "$*" >&2; }

case "$BASE" in
    registry) BASE_IMAGE=$REGISTRY_BASE ;;
    local) BASE_IMAGE=$(bash kind/base-image.sh) ;;
    auto)
        if "$DOCKER" image inspect "$REGISTRY_BASE" >/dev/null 2>&1 ||
            timeout 60 "$DOCKER" pull -q "$REGISTRY_BASE" >/dev/null 2>&1; then
            BASE_IMAGE=$REGISTRY_BASE
        else
            log "$REGISTRY_BASE cannot be pulled: building on the local Debian base"
            BASE_IMAGE=$(bash kind/base-image.sh)
        fi
        ;;
    *) BASE_IMAGE=$BASE ;;
esac

# The workspace members each image installs (the adapter imports the broker's codec, the
# simulator the client codec).
members() {
    case "$1" in
        broker) echo broker ;;
        adapter) echo "adapter broker" ;;
        simulator) echo "simulator mqttclient" ;;
    esac
}

# wheelhouse COMPONENT: build/wheelhouse/COMPONENT/ with requirements.txt (third-party, hashed)
# and every wheel the image installs.
wheelhouse() {
    local component=$1 out=build/wheelhouse/$1
    rm -rf "$out"
    mkdir -p "$out"
    "$UV" export --frozen --no-dev --package "mcloudtt-$component" --no-emit-workspace \
        --format requirements.txt --quiet -o "$out/requirements.txt"
    local key cached
    key=$(sha256sum "$out/requirements.txt" | cut -c1-16)
    cached=$CACHE/wheelhouse/$key
    if [ ! -f "$cached/.complete" ]; then
        log "wheelhouse for $component: downloading the locked wheels into $cached"
        rm -rf "$cached"
        mkdir -p "$cached"
        # --require-hashes: exactly the files uv.lock pins.
        "$UV" "${PIP[@]}" wheel --quiet --require-hashes --no-deps -r "$out/requirements.txt" \
            -w "$cached" >&2
        touch "$cached/.complete"
    fi
    cp -l "$cached"/*.whl "$out"/ 2>/dev/null || cp "$cached"/*.whl "$out"/
    for member in $(members "$component"); do
        "$UV" build --quiet --wheel --package "mcloudtt-$member" -o "$out" >&2
    done
}

for component in "${COMPONENTS[@]}"; do
    wheelhouse "$component"
    image=mcloudtt-$component:$TAG
    log "building $image on $BASE_IMAGE"
    # --network none: the build cannot reach anything, so it installs from the wheelhouse or fails.
    # The classic builder: BuildKit needs the buildx plugin, which Debian's docker.io lacks.
    DOCKER_BUILDKIT=0 "$DOCKER" build --quiet --network none \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -f "$component/Dockerfile" -t "$image" . 2>&1 >/dev/null |
        { grep -v -E '^(DEPRECATED: The legacy builder| +BuildKit is currently| +environment-variable|$)' || true; } >&2
    echo "$image"
done
