#!/usr/bin/env bash
# Make a development CA, server and client certificates and bearer tokens for running both
# services with mutual TLS and authentication (docker-compose, Kubernetes Secrets, a laptop).
#
#   bash scripts/make_dev_secrets.sh [--group GID] [DIR]   (default deploy/secrets; never commit it)
#
# --group GID: the directory, the services' keys and the services' tokens are given group
# GID and made group-readable (0750 / 0640), for containers that run as that group: the voxserve image runs as
# 10001:10001, so docker-compose.yml needs `--group 10001` (chgrp to a group you are not in
# needs root: run the script with sudo). Without it everything is private to you (0700 / 0600).
#
# DIR/ca.pem                 the CA every client trusts and every server checks clients with
# DIR/server.pem, .key       one certificate for both services (SANs: model-store, inference,
#                            http-gateway, localhost, 127.0.0.1)
# DIR/inference.pem, .key    the inference service's client certificate (to the store)
# DIR/voxctl.pem, .key       a client certificate for voxctl / other backend services
# DIR/gateway.pem, .key      the HTTP gateway's client certificate
# DIR/healthcheck.pem, .key  the containers' health probes (mutual TLS needs a client certificate)
# DIR/prometheus.pem, .key   Prometheus scraping the services' /metrics over mutual TLS
# DIR/haproxy.pem, .key      HAProxy routing by model (deploy/haproxy): its server certificate
#                            for clients (SAN haproxy) and its client certificate to the replicas
# DIR/tokens.yaml            the tokens file both services read: sha256 hashes and roles only
# DIR/token-<name>           each token itself, for the client that uses it (ops, ci-bot,
#                            inference, gateway)
# Existing files are kept, so running it again does not rotate anything; delete DIR to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
group=""
if [[ "${1:-}" == "--group" ]]; then
    [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "make_dev_secrets.sh: --group needs a numeric GID" >&2; exit 2; }
    group=$2
    shift 2
fi
dir="${1:-deploy/secrets}"
mkdir -p "$dir"
chmod 700 "$dir"
days=825

if [[ ! -f "$dir/ca.pem" ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
        -subj "/O=voxserve dev/CN=voxserve dev CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
fi

issue() {  # issue NAME SUBJECT_CN EXTENDED_KEY_USAGE [SAN]
    local name=$1 cn=$2 usage=$3 san=${4:-}
    [[ -f "$dir/$name.pem" ]] && return
    local ext
    ext=$(mktemp)
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$usage"
        [[ -n "$san" ]] && echo "subjectAltName=$san"
    } >"$ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=voxserve dev/CN=$cn" \
        -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
        -days "$days" -extfile "$ext" -out "$dir/$name.pem" 2>/dev/null
    rm -f "$dir/$name.csr" "$ext"
    chmod 600 "$dir/$name.key"
}

issue server "voxserve services" serverAuth \
    "DNS:model-store,DNS:inference,DNS:http-gateway,DNS:localhost,IP:127.0.0.1"
issue inference "inference" clientAuth
issue voxctl "voxctl" clientAuth
issue gateway "http-gateway" clientAuth
issue healthcheck "healthcheck" clientAuth
issue prometheus "prometheus" clientAuth
issue haproxy "haproxy" serverAuth,clientAuth "DNS:haproxy,DNS:localhost,IP:127.0.0.1"

declare -A roles=([ops]="admin" [ci-bot]="read, transcribe" [inference]="read, pull" [gateway]="read, pull, transcribe")
if [[ ! -f "$dir/tokens.yaml" ]]; then
    {
        echo "# sha256 of each token and its roles; the tokens themselves are in token-<name>."
        echo "tokens:"
        for name in ops ci-bot inference gateway; do
            openssl rand -hex 32 >"$dir/token-$name"
            chmod 600 "$dir/token-$name"
            digest=$(tr -d '\n' <"$dir/token-$name" | sha256sum | cut -d' ' -f1)
            echo "  $name: {sha256: $digest, roles: [${roles[$name]}]}"
        done
    } >"$dir/tokens.yaml"
fi
chmod 644 "$dir"/*.pem "$dir/tokens.yaml"
if [[ -n "$group" ]]; then
    # What a container reads: the service keys and the services' own tokens. ca.key (signs
    # certificates) and the people's tokens (ops, ci-bot) stay private.
    shared=("$dir/server.key" "$dir/inference.key" "$dir/gateway.key" "$dir/healthcheck.key"
        "$dir/prometheus.key" "$dir/haproxy.key" "$dir/token-inference" "$dir/token-gateway")
    if ! chgrp "$group" "$dir" "${shared[@]}" 2>/dev/null; then
        echo "make_dev_secrets.sh: cannot give $dir to group $group (run it as root: sudo bash $0 --group $group $dir)" >&2
        exit 1
    fi
    chmod 750 "$dir"
    chmod 640 "${shared[@]}"
fi
echo "dev secrets in $dir (CA, certificates, tokens.yaml, token-*)"
