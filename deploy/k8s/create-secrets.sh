#!/usr/bin/env bash
# The two Secrets the manifests mount, from the files of scripts/make_dev_secrets.sh (or your
# own CA's, with the same names), as YAML on stdout; apply them before `kubectl apply -k`:
#
#   bash scripts/make_dev_secrets.sh
#   bash deploy/k8s/create-secrets.sh | kubectl apply -f -          (again to rotate)
#
# voxserve-tls     ca.pem, server.pem/.key (both services and the gateway's HTTPS),
#                  inference.pem/.key and gateway.pem/.key (client certificates to the
#                  backends), healthcheck.pem/.key (the exec probes under mutual TLS),
#                  haproxy.pem/.key when present (components/model-routing)
# voxserve-tokens  tokens.yaml (sha256 hashes and roles only), token-inference and
#                  token-gateway (the services' own tokens). The people's tokens (ops,
#                  ci-bot) never enter the cluster.
# The Prometheus client certificate (prometheus.pem/.key + ca.pem) goes to the namespace of
# your Prometheus: see deploy/README.md.
set -euo pipefail
dir="${1:-$(dirname "$0")/../secrets}"
namespace="${NAMESPACE:-voxserve}"
for f in ca.pem server.pem server.key inference.pem inference.key gateway.pem gateway.key \
    healthcheck.pem healthcheck.key tokens.yaml token-inference token-gateway; do
    [[ -f "$dir/$f" ]] || { echo "create-secrets.sh: $dir/$f is missing (run scripts/make_dev_secrets.sh)" >&2; exit 1; }
done
# HAProxy's certificate (components/model-routing), when the directory has it.
router=()
[[ -f "$dir/haproxy.pem" && -f "$dir/haproxy.key" ]] && router=(--from-file="$dir/haproxy.pem" --from-file="$dir/haproxy.key")
kubectl create secret generic voxserve-tls --namespace "$namespace" --dry-run=client -o yaml \
    --from-file="$dir/ca.pem" --from-file="$dir/server.pem" --from-file="$dir/server.key" \
    --from-file="$dir/inference.pem" --from-file="$dir/inference.key" \
    --from-file="$dir/gateway.pem" --from-file="$dir/gateway.key" \
    --from-file="$dir/healthcheck.pem" --from-file="$dir/healthcheck.key" "${router[@]}"
echo "---"
kubectl create secret generic voxserve-tokens --namespace "$namespace" --dry-run=client -o yaml \
    --from-file="$dir/tokens.yaml" --from-file="$dir/token-inference" --from-file="$dir/token-gateway"
