#!/usr/bin/env bash
# Create .venv with the project installed from the lock (requirements/test.lock), then voxserve.
# System packages: python3-venv if venv is missing; with --test also espeak-ng, sox,
# prometheus (promtool checks the Prometheus config in the tests), haproxy and nginx (the
# routing tests run them in front of inference replicas), chromium and chromium-driver (the web
# console in a real browser), kubectl and, as root, podman, runc,
# podman-compose and debootstrap (the compose stack test).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

SUDO=""
if [[ "$(id -u)" != "0" ]]; then SUDO="sudo"; fi

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "==> installing system packages: ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "voxserve needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
fi
if ((want_test)); then
    apt_install espeak-ng sox prometheus
    # tests/routing/: the deployed configs of deploy/haproxy and deploy/nginx, run for real.
    apt_install haproxy nginx
    # tests/http_gateway/test_console_browser.py: headless Chromium driven by Selenium through
    # the system chromedriver (Selenium's own driver download is not used).
    apt_install chromium chromium-driver
    # kubectl builds the Kubernetes manifests (kustomize) in tests/deploy.
    command -v kubectl >/dev/null 2>&1 || apt_install kubernetes-client
    # tests/deploy/test_compose_podman.py brings the compose stack up with rootful podman
    # (runc; images built from Debian packages with debootstrap): as root only.
    if [[ "$(id -u)" == "0" ]]; then apt_install podman runc podman-compose debootstrap; fi
fi

stamp=".venv/.voxserve-installed"
lock="requirements/test.lock"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || "$lock" -nt "$stamp" ]]; then
    echo "==> creating .venv"
    [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
    # Every dependency at the version and sha256 the lock names (scripts/lock.sh refreshes
    # it), so a fresh clone always gets the same environment. torch is the CPU build
    # (2.13.0+cpu, from pip's configured find-links), never a multi-GB CUDA build.
    echo "==> installing the locked dependencies ($lock)"
    .venv/bin/python -m pip install -q --require-hashes -r "$lock"
    echo "==> installing voxserve"
    .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
    .venv/bin/python -m pip check
    touch "$stamp"
fi
