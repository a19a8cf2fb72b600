#!/usr/bin/env bash
# Prepare the gke overlay from the Terraform outputs, for one image tag:
#   - writes kind/overlays/gke/gke.env (not committed): image names, the adapter's Google
#     service account, the BigQuery table, the Memorystore address and range;
#   - creates or updates, in the current kubectl context, the namespace, the Secret
#     mcloudtt-redis (the Memorystore AUTH string) and the ConfigMap mcloudtt-redis-ca (its
#     server CA). Secret values go through files in a private temp dir, never argv.
#
#   kind/overlays/gke/configure.sh TAG
#
# Run after `terraform apply` and `gcloud container clusters get-credentials ...`; then
#   kubectl apply -k kind/overlays/gke
set -euo pipefail

TAG=${1:?usage: configure.sh TAG (the image tag pushed to Artifact Registry)}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
TF_DIR=${TF_DIR:-$ROOT/terraform}
NAMESPACE=mcloudtt

tf() { terraform -chdir="$TF_DIR" output -raw "$1"; }

repo=$(tf image_repository)
{
    echo "# Written by configure.sh from the Terraform outputs in $TF_DIR; do not commit."
    echo "BROKER_IMAGE=$repo/mcloudtt-broker:$TAG"
    echo "ADAPTER_IMAGE=$repo/mcloudtt-adapter:$TAG"
    echo "ADAPTER_GSA=$(tf adapter_service_account)"
    echo "BIGQUERY_TABLE=$(tf bigquery_table)"
    echo "REDIS_HOST=$(tf redis_host)"
    echo "REDIS_PORT=$(tf redis_port)"
    echo "REDIS_RANGE=$(tf redis_reserved_range)"
} >"$HERE/gke.env"
echo "wrote $HERE/gke.env"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(
    umask 077
    tf redis_auth_string >"$work/password"
    tf redis_server_ca >"$work/ca.pem"
)
if [ "$(tf redis_backend)" = cluster ]; then
    # Memorystore for Redis Cluster: no AUTH string; its server CA comes from the API.
    gcloud redis clusters get-cluster-certificate-authority "$(tf redis_cluster_name)" \
        --region="$(tf redis_region)" --format=json |
        python3 -c 'import json, sys; ca = json.load(sys.stdin)["managedServerCa"]; print("\n".join(c for chain in ca["caCerts"] for c in chain["certificates"]))' \
            >"$work/ca.pem"
fi

kubectl apply -f "$ROOT/kind/base/namespace.yaml"
kubectl -n "$NAMESPACE" create secret generic mcloudtt-redis \
    --from-file=password="$work/password" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$NAMESPACE" create configmap mcloudtt-redis-ca \
    --from-file=ca.pem="$work/ca.pem" --dry-run=client -o yaml | kubectl apply -f -

# The brokers' cluster key (HMAC on Redis): made once, kept across runs (a rotation puts the
# new key first and the old one second, then removes the old one: docs/cluster-envelope.md).
if ! kubectl -n "$NAMESPACE" get secret mcloudtt-cluster-key >/dev/null 2>&1; then
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$work/cluster-key")
    kubectl -n "$NAMESPACE" create secret generic mcloudtt-cluster-key \
        --from-file=key="$work/cluster-key"
fi

if ! kubectl -n "$NAMESPACE" get secret mcloudtt-broker-tls >/dev/null 2>&1; then
    echo "note: create the MQTT TLS certificate Secret before applying (docs/deploy.md):"
    echo "  kubectl -n $NAMESPACE create secret tls mcloudtt-broker-tls --cert=FULLCHAIN.pem --key=KEY.pem"
fi
echo "next: kubectl apply -k kind/overlays/gke"
