#!/usr/bin/env bash
# MCloudTT on a local kind cluster: create the cluster (kind/cluster.yaml) unless it exists,
# build the broker and adapter images, load them into the nodes, create the Redis password
# Secret (once), apply kind/overlays/kind and wait until Redis, the brokers and the adapter are
# ready. Idempotent: run it again after a code change to rebuild and roll the pods.
#
#   kind/up.sh [--skip-build] [--base auto|registry|local|IMAGE] [--timeout SECONDS]
#              [--redis-cluster]
#
# --redis-cluster: a Redis Cluster of three primaries and three replicas instead of the single
# Redis (kind/overlays/kind-redis-cluster = the kind overlay + components/redis-cluster); the
# other Redis's StatefulSet is removed when switching (the data of the one left is not moved).
# --base: what the images build on (kind/images.sh; default auto: the official slim Python
# image when it can be pulled, else a Debian bookworm base made locally with debootstrap).
# Needs docker (a running daemon), kind >= 0.24 and kubectl. Environment:
#   KIND_CLUSTER_NAME  cluster name (default mcloudtt)
#   DOCKER             docker-compatible CLI (default docker; e.g. podman)
# MQTT is then on 127.0.0.1:1883 and MQTT over WebSocket on 127.0.0.1:8083 (stop any local
# broker on those ports first). kind/down.sh removes it all.
set -euo pipefail

cd "$(dirname "$0")/.."
CLUSTER=${KIND_CLUSTER_NAME:-mcloudtt}
DOCKER=${DOCKER:-docker}
NAMESPACE=mcloudtt
TAG=dev # kind/base/kustomization.yaml names the images mcloudtt-broker:dev and mcloudtt-adapter:dev
BUILD=1
BASE=auto
TIMEOUT=300
OVERLAY=kind/overlays/kind

while [ $# -gt 0 ]; do
    case "$1" in
        --skip-build) BUILD=0 ;;
        --redis-cluster) OVERLAY=kind/overlays/kind-redis-cluster ;;
        --base)
            BASE=${2:?--base needs auto, registry, local or an image}
            shift
            ;;
        --timeout)
            TIMEOUT=${2:?--timeout needs seconds}
            shift
            ;;
        -h | --help)
            sed -n '2,23p' "$0"
            exit 0
            ;;
        *)
            echo "kind/up.sh: unknown option $1" >&2
            exit 2
            ;;
    esac
    shift
done

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

for tool in "$DOCKER" kind kubectl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "kind/up.sh: $tool is not installed" >&2
        exit 1
    fi
done

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    say "kind cluster $CLUSTER exists"
    existed=1
else
    say "creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --config kind/cluster.yaml --wait 180s
    existed=0
fi
CONTEXT="kind-$CLUSTER"
k() { kubectl --context "$CONTEXT" "$@"; }

if [ "$BUILD" = 1 ]; then
    # The same builds as CI: a wheelhouse made here, no network inside the build; on the
    # official slim Python image, or on a local Debian one where no registry is reachable.
    say "building mcloudtt-broker:$TAG and mcloudtt-adapter:$TAG (kind/images.sh)"
    DOCKER=$DOCKER bash kind/images.sh --base "$BASE" --tag "$TAG" broker adapter
fi
say "loading images into the nodes"
kind load docker-image --name "$CLUSTER" "mcloudtt-broker:$TAG" "mcloudtt-adapter:$TAG"

k apply -f kind/base/namespace.yaml
if ! k -n "$NAMESPACE" get secret mcloudtt-redis >/dev/null 2>&1; then
    say "creating the Redis password (Secret $NAMESPACE/mcloudtt-redis)"
    secret_dir=$(mktemp -d)
    trap 'rm -rf "$secret_dir"' EXIT
    # Hex: safe inside the redis:// URL the pods build from it.
    (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$secret_dir/password")
    k -n "$NAMESPACE" create secret generic mcloudtt-redis --from-file=password="$secret_dir/password"
fi
if ! k -n "$NAMESPACE" get secret mcloudtt-cluster-key >/dev/null 2>&1; then
    say "creating the cluster key (Secret $NAMESPACE/mcloudtt-cluster-key)"
    key_dir=$(mktemp -d)
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$key_dir/key")
    k -n "$NAMESPACE" create secret generic mcloudtt-cluster-key --from-file=key="$key_dir/key"
    rm -rf "$key_dir"
fi

# kubectl apply does not prune: the Redis of the other layout goes first (its pods would
# otherwise keep the Service's name label and take connections).
if [ "$OVERLAY" = kind/overlays/kind-redis-cluster ]; then
    k -n "$NAMESPACE" delete statefulset mcloudtt-redis --ignore-not-found
else
    k -n "$NAMESPACE" delete statefulset mcloudtt-redis-cluster --ignore-not-found
    k -n "$NAMESPACE" delete job mcloudtt-redis-cluster-init --ignore-not-found
fi
say "applying $OVERLAY"
k apply -k "$OVERLAY"

if [ "$existed" = 1 ] && [ "$BUILD" = 1 ]; then
    # Same tag, new image: restart so the pods pick it up.
    k -n "$NAMESPACE" rollout restart statefulset/mcloudtt-broker deployment/mcloudtt-adapter
fi

say "waiting for Redis, the brokers and the adapter (up to ${TIMEOUT}s each)"
if [ "$OVERLAY" = kind/overlays/kind-redis-cluster ]; then
    k -n "$NAMESPACE" rollout status statefulset/mcloudtt-redis-cluster --timeout="${TIMEOUT}s"
    # The Job joins the six nodes (redis-cli --cluster create) once they all answer.
    k -n "$NAMESPACE" wait --for=condition=complete job/mcloudtt-redis-cluster-init \
        --timeout="${TIMEOUT}s"
else
    k -n "$NAMESPACE" rollout status statefulset/mcloudtt-redis --timeout="${TIMEOUT}s"
fi
k -n "$NAMESPACE" rollout status statefulset/mcloudtt-broker --timeout="${TIMEOUT}s"
k -n "$NAMESPACE" rollout status deployment/mcloudtt-adapter --timeout="${TIMEOUT}s"
k -n "$NAMESPACE" get pods -o wide

cat <<MSG

MCloudTT is up on kind cluster $CLUSTER (kubectl context $CONTEXT).
  MQTT:           127.0.0.1:1883    mosquitto_sub -h 127.0.0.1 -t '#' -v
  MQTT/WebSocket: 127.0.0.1:8083
  broker metrics: kubectl --context $CONTEXT -n $NAMESPACE port-forward mcloudtt-broker-0 8080
  adapter:        kubectl --context $CONTEXT -n $NAMESPACE port-forward svc/mcloudtt-adapter 9100
                  (then http://127.0.0.1:9100/report)
Tear down with kind/down.sh.
MSG
