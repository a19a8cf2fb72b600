#!/usr/bin/env bash
# Tear down what kind/up.sh made: by default the whole kind cluster; with --keep-cluster only
# the mcloudtt namespace (pods, the Redis and DuckDB volumes, the Secret).
#
#   kind/down.sh [--keep-cluster]
set -euo pipefail

CLUSTER=${KIND_CLUSTER_NAME:-mcloudtt}
NAMESPACE=mcloudtt
KEEP=0

while [ $# -gt 0 ]; do
    case "$1" in
        --keep-cluster) KEEP=1 ;;
        -h | --help)
            sed -n '2,6p' "$0"
            exit 0
            ;;
        *)
            echo "kind/down.sh: unknown option $1" >&2
            exit 2
            ;;
    esac
    shift
done

if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    echo "kind/down.sh: no kind cluster named $CLUSTER"
    exit 0
fi

if [ "$KEEP" = 1 ]; then
    # The namespace takes its StatefulSets' volume claims with it (kustomize alone would not).
    kubectl --context "kind-$CLUSTER" delete namespace "$NAMESPACE" --ignore-not-found --wait=true
else
    kind delete cluster --name "$CLUSTER"
fi
