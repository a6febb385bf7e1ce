"""TLS and tokens in the deployment: no service runs insecure, compose and Kubernetes mount
the dev secrets the services and Prometheus use for mutual TLS, and nothing more."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_facts import (
    COMPOSE_SERVICE,
    GATEWAY_COMPOSE_SERVICE,
    GATEWAY_JOB,
    JOBS,
    K8S_DIR,
    PROMETHEUS_DIR,
    compose_env,
    container_of,
    flags_of,
    healthcheck_argv,
    kubectl_path,
    kustomization,
    load_service_config,
    scrape_jobs,
)

VOXSERVE_COMPOSE_SERVICES = (*COMPOSE_SERVICE.values(), GATEWAY_COMPOSE_SERVICE)
SECRETS_MOUNT = "/run/secrets/"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _secret_paths(value: Any) -> set[str]:
    """Every /run/secrets/<name> a command, healthcheck or config mentions."""
    return {m for text in _strings(value) for m in re.findall(r"/run/secrets/[A-Za-z0-9._-]+", text)}


def test_no_voxserve_service_runs_insecure(compose: dict[str, Any], k8s_objects: list[dict[str, Any]]) -> None:
    for name in VOXSERVE_COMPOSE_SERVICES:
        assert "--insecure" not in [str(c) for c in compose["services"][name]["command"]], name
    for obj in k8s_objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            assert "--insecure" not in container_of(obj)["args"], obj["metadata"]["name"]


SECRET_FILE_NAMES = {"haproxy.pem.key": "haproxy.key"}


def test_compose_secrets_are_the_dev_secrets(compose: dict[str, Any], dev_secrets: Path) -> None:
    declared = compose["secrets"]
    for name, secret in declared.items():
        # /run/secrets/<name> is the file of the same name that make_dev_secrets.sh writes;
        # HAProxy alone reads a key as <certificate>.key, the key file under another name.
        file = SECRET_FILE_NAMES.get(name, name)
        assert secret["file"] == f"./deploy/secrets/{file}", name
        assert (dev_secrets / file).is_file(), f"make_dev_secrets.sh does not make {file}"
    assert not {"ca.key", "token-ops", "token-ci-bot"} & set(declared), "never give a container these"
    for name, service in compose["services"].items():
        used = _secret_paths({k: v for k, v in service.items() if k != "secrets"})
        if name == "prometheus":
            used |= _secret_paths(yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text()))
        listed = {SECRETS_MOUNT + s for s in service.get("secrets", [])}
        assert used <= listed, f"{name} reads secrets it does not mount: {used - listed}"
        assert set(service.get("secrets", [])) <= set(declared), name


def test_compose_services_serve_mutual_tls_with_tokens(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = {}
    for job, name in COMPOSE_SERVICE.items():
        service = compose["services"][name]
        config = load_service_config(job, service["command"], compose_env(service), monkeypatch)
        configs[job] = config
        assert config.insecure is False
        assert (str(config.tls_cert), str(config.tls_key)) == ("/run/secrets/server.pem", "/run/secrets/server.key")
        assert str(config.tls_client_ca) == "/run/secrets/ca.pem", "mutual TLS"
        assert str(config.auth_tokens) == "/run/secrets/tokens.yaml"
        flags = flags_of(healthcheck_argv(service))
        assert (flags["--tls-ca"], flags["--tls-cert"], flags["--tls-key"]) == (
            "/run/secrets/ca.pem",
            "/run/secrets/healthcheck.pem",
            "/run/secrets/healthcheck.key",
        )
    inference = configs["inference_service"]
    assert (str(inference.store_tls_ca), str(inference.store_tls_cert), str(inference.store_tls_key)) == (
        "/run/secrets/ca.pem",
        "/run/secrets/inference.pem",
        "/run/secrets/inference.key",
    )
    assert str(inference.store_token_file) == "/run/secrets/token-inference"

    service = compose["services"][GATEWAY_COMPOSE_SERVICE]
    gateway = load_service_config(GATEWAY_JOB, service["command"], compose_env(service), monkeypatch)
    for backend in ("store", "inference"):
        assert str(getattr(gateway, f"{backend}_tls_ca")) == "/run/secrets/ca.pem"
        assert str(getattr(gateway, f"{backend}_tls_cert")) == "/run/secrets/gateway.pem"
        assert str(getattr(gateway, f"{backend}_tls_key")) == "/run/secrets/gateway.key"


def test_prometheus_scrapes_the_services_over_mutual_tls(prometheus_config: dict[str, Any]) -> None:
    jobs = scrape_jobs(prometheus_config)
    for job in (*JOBS, GATEWAY_JOB):
        assert jobs[job]["scheme"] == "https", job
        tls = jobs[job]["tls_config"]
        assert (tls["ca_file"], tls["cert_file"], tls["key_file"]) == (
            "/run/secrets/ca.pem",
            "/run/secrets/prometheus.pem",
            "/run/secrets/prometheus.key",
        )
    k8s = scrape_jobs(yaml.safe_load((PROMETHEUS_DIR / "prometheus-k8s.yml").read_text()))
    names = {"model_service": "model-store", "inference_service": "inference", GATEWAY_JOB: "http-gateway"}
    for job, name in names.items():
        assert k8s[job]["scheme"] == "https"
        # Targets are pod IPs: the certificate is checked against the Service name it carries.
        assert k8s[job]["tls_config"]["server_name"] == name


def _k8s_secret_items(objects: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Secret name -> keys the workloads mount from it."""
    out: dict[str, set[str]] = {}
    for obj in objects:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for volume in obj["spec"]["template"]["spec"]["volumes"]:
            if "secret" in volume:
                keys = {item["key"] for item in volume["secret"]["items"]}
                out.setdefault(volume["secret"]["secretName"], set()).update(keys)
    return out


def test_k8s_mounts_tls_and_tokens_from_secrets(k8s_objects: list[dict[str, Any]], dev_secrets: Path) -> None:
    items = _k8s_secret_items(k8s_objects)
    assert set(items) == {"voxserve-tls", "voxserve-tokens"}
    for keys in items.values():
        for key in keys:
            assert (dev_secrets / key).is_file(), f"make_dev_secrets.sh does not make {key}"
    for obj in k8s_objects:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        container = container_of(obj)
        secret_volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        files = set()
        for name, secret in secret_volumes.items():
            assert mounts[name]["readOnly"] is True, name
            assert secret["defaultMode"] == 0o440, "group-readable (fsGroup), nobody else"
            files |= {f"{mounts[name]['mountPath']}/{item['path']}" for item in secret["items"]}
        assert pod["securityContext"]["fsGroup"] == 10001
        # Every file a flag or probe names is one of the mounted secret files.
        probes = [container[p]["exec"]["command"] for p in ("startupProbe", "livenessProbe") if "exec" in container[p]]
        referenced = {
            v
            for arg in [*container["args"], *(a for p in probes for a in p)]
            for v in [str(arg).split("=", 1)[-1]]
            if v.startswith("/etc/voxserve/")
        }
        assert referenced and referenced <= files, f"{obj['metadata']['name']}: {referenced - files}"


def test_k8s_create_secrets_script_makes_what_the_manifests_mount(
    k8s_objects: list[dict[str, Any]], dev_secrets: Path
) -> None:
    kubectl = kubectl_path()
    result = subprocess.run(
        ["bash", str(K8S_DIR / "create-secrets.sh"), str(dev_secrets)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{Path(kubectl).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout) if d}
    for name, keys in _k8s_secret_items(k8s_objects).items():
        assert secrets[name]["metadata"]["namespace"] == kustomization()["namespace"]
        assert keys <= set(secrets[name]["data"]), name
    people = {"token-ops", "token-ci-bot", "ca.key", "voxctl.key"}
    assert not people & {key for s in secrets.values() for key in s["data"]}, "people's secrets stay out"

    missing = subprocess.run(
        ["bash", str(K8S_DIR / "create-secrets.sh"), str(dev_secrets.parent / "nowhere")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "make_dev_secrets.sh" in missing.stderr
