"""Model routing as deployed: deploy/haproxy (compose and the Kubernetes component model-routing),
deploy/nginx and the Istio DestinationRule route on the header the clients send, check the
inference service's own gRPC health, and the real haproxy and nginx accept their files.

The routing itself runs in tests/routing/ (the real HAProxy and nginx in front of real replicas)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.deploy_facts import (
    COMPOSE_SERVICE,
    DEPLOY,
    GATEWAY_COMPOSE_SERVICE,
    GRPC_PORT,
    HEALTH_SERVICE,
    K8S_DIR,
    ROUTER_COMPOSE_SERVICE,
    flags_of,
    kubectl_path,
    kustomization,
    load_all,
)
from tests.proxies import haproxy_secrets, nginx_config
from tests.support import require_tool
from voxserve_common.routing import MODEL_HEADER

HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
COMPONENT = K8S_DIR / "components" / "model-routing"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
INFERENCE_PORT = GRPC_PORT["inference_service"]


def health_check_generator() -> Any:
    spec = importlib.util.spec_from_file_location("grpc_health_check", DEPLOY / "haproxy" / "grpc_health_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backends(text: str) -> dict[str, list[str]]:
    """Each backend section's lines (stripped, comments dropped)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.strip().startswith("tcp-check") else raw.strip()
        if not raw.startswith((" ", "\t")):
            match = re.match(r"backend (\S+)", raw)
            current = sections.setdefault(match.group(1), []) if match else None
        elif current is not None and line:
            current.append(line)
    return sections


def test_haproxy_routes_on_the_clients_header_and_checks_grpc_health() -> None:
    found = backends(HAPROXY_CFG.read_text())
    assert set(found) == {"by_model", "by_load"}
    by_model, by_load = found["by_model"], found["by_load"]
    assert f"balance hdr({MODEL_HEADER})" in by_model
    assert any(line.startswith("hash-type consistent") for line in by_model)
    assert "hash-balance-factor 150" in by_model  # a hot model spills to a second replica
    assert "balance leastconn" in by_load
    text = HAPROXY_CFG.read_text()
    assert f"use_backend by_model if {{ req.hdr({MODEL_HEADER}) -m found }}" in text
    # The check is the one the generator writes for the inference service's health name.
    lines = health_check_generator().check_lines(service=HEALTH_SERVICE["inference_service"])
    for section in (by_model, by_load):
        assert [line for line in section if line.startswith("tcp-check")] == lines
        assert "option tcp-check" in section
        (template,) = [line for line in section if line.startswith("server-template")]
        assert f'"${{VOXSERVE_REPLICAS-{COMPOSE_SERVICE["inference_service"]}:{INFERENCE_PORT}}}"' in template


def test_the_kubernetes_component_runs_the_same_haproxy_config() -> None:
    assert (COMPONENT / "haproxy.cfg").read_text() == HAPROXY_CFG.read_text(), (
        "deploy/k8s/components/model-routing/haproxy.cfg must be a copy of deploy/haproxy/haproxy.cfg"
    )


def test_haproxy_accepts_the_config(dev_secrets: Path, tmp_path: Path) -> None:
    haproxy = require_tool("haproxy")
    secrets = tmp_path / "secrets"
    shutil.copytree(dev_secrets, secrets)
    env = {
        **os.environ,
        "VOXSERVE_SECRETS": str(haproxy_secrets(secrets)),
        "HAPROXY_ADMIN_SOCKET": str(tmp_path / "admin.sock"),
    }
    checked = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "WARNING" not in checked.stdout + checked.stderr


def test_nginx_accepts_its_config(dev_secrets: Path, tmp_path: Path) -> None:
    nginx = require_tool("nginx")
    text = NGINX_CONF.read_text()
    assert f"hash $http_{MODEL_HEADER.replace('-', '_')} consistent;" in text
    assert "least_conn;" in text and "grpc_pass grpcs://$inference_pool;" in text
    secrets = tmp_path / "secrets"
    shutil.copytree(dev_secrets, secrets)
    config = tmp_path / "nginx.conf"
    config.write_text(nginx_config(["127.0.0.1:1", "127.0.0.1:2"], secrets, 50099))
    pid = f"pid {tmp_path / 'nginx.pid'};"
    checked = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(config), "-g", pid], capture_output=True)
    assert checked.returncode == 0, checked.stderr.decode()


def test_compose_routes_the_inference_replicas_through_haproxy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    router, inference = services[ROUTER_COMPOSE_SERVICE], services[COMPOSE_SERVICE["inference_service"]]
    replicas = inference["deploy"]["replicas"]
    assert replicas >= 2 and not inference.get("ports")
    env = router["environment"]
    assert env["VOXSERVE_REPLICAS"] == f"{COMPOSE_SERVICE['inference_service']}:{INFERENCE_PORT}"
    assert int(env["VOXSERVE_REPLICA_SLOTS"]) >= replicas
    assert env["VOXSERVE_SECRETS"] == "/run/secrets"
    config_path = router["command"][-1]
    assert f"./deploy/haproxy/haproxy.cfg:{config_path}:ro" in router["volumes"]
    # Every file the config reads is a secret the service mounts (the key as HAProxy names it).
    read = set(re.findall(r'\$\{VOXSERVE_SECRETS-/run/secrets\}/([\w.-]+)"', HAPROXY_CFG.read_text()))
    assert read | {"haproxy.pem.key"} <= set(router["secrets"])
    assert [p.rsplit(":", 1)[-1] for p in router["ports"]] == [str(INFERENCE_PORT)]
    gateway = flags_of([str(c) for c in services[GATEWAY_COMPOSE_SERVICE]["command"]])
    assert gateway["--inference"] == f"{ROUTER_COMPOSE_SERVICE}:{INFERENCE_PORT}"
    log_dirs = [c for c in inference["command"] if str(c).startswith("--log-dir=")]
    assert log_dirs == ["--log-dir=/var/log/voxserve/{hostname}"], "replicas sharing the logs volume"


def _component() -> dict[str, Any]:
    return yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())


def test_the_kubernetes_component_finds_the_ready_inference_pods() -> None:
    component = _component()
    objects = [doc for resource in component["resources"] for doc in load_all(COMPONENT / resource)]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 1  # one ring (see the manifest's comment)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    namespace = kustomization()["namespace"]
    base = [doc for resource in kustomization()["resources"] for doc in load_all(K8S_DIR / resource)]
    headless = next(o for o in base if o["kind"] == "Service" and o["metadata"]["name"] == "inference-headless")
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"].get("publishNotReadyAddresses")
    assert env["VOXSERVE_REPLICAS"] == f"inference-headless.{namespace}.svc.cluster.local:{INFERENCE_PORT}"
    inference = next(o for o in base if o["kind"] == "Deployment" and o["metadata"]["name"] == "inference")
    assert int(env["VOXSERVE_REPLICA_SLOTS"]) >= inference["spec"]["replicas"] + 1  # and a surge pod
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert container["args"][-1] == f"{mounts['config']}/haproxy.cfg"
    assert mounts["tls"] == env["VOXSERVE_SECRETS"]
    (tls,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert {"path": "haproxy.pem.key", "key": "haproxy.key"} in tls["secret"]["items"]
    (service,) = [o for o in objects if o["kind"] == "Service"]
    assert {p["port"] for p in service["spec"]["ports"]} == {INFERENCE_PORT, 8405}


def test_kustomize_builds_the_model_routing_component(tmp_path: Path) -> None:
    kubectl = kubectl_path()
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(K8S_DIR, overlay)
    manifest = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [rel],
        "components": [f"{rel}/components/model-routing"],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(manifest))
    built = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built.stdout)}
    (gateway,) = docs[("Deployment", "http-gateway")]["spec"]["template"]["spec"]["containers"]
    assert f"--inference=haproxy:{INFERENCE_PORT}" in gateway["args"]
    (config_map,) = [d for (kind, name), d in docs.items() if kind == "ConfigMap" and name.startswith("haproxy")]
    assert config_map["data"]["haproxy.cfg"] == HAPROXY_CFG.read_text()
    volumes = docs[("Deployment", "haproxy")]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}} in volumes
    # Without the component, clients and the gateway call the inference Service as before.
    base = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60)
    assert "--inference=inference:50052" in base.stdout and "haproxy" not in base.stdout


def test_the_istio_destination_rule_hashes_the_same_header() -> None:
    (rule,) = load_all(COMPONENT / "istio-destinationrule.yaml")
    assert rule["kind"] == "DestinationRule"
    assert rule["spec"]["host"].startswith(f"{COMPOSE_SERVICE['inference_service']}.")
    assert rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"] == MODEL_HEADER
    assert "istio-destinationrule.yaml" not in _component()["resources"]  # needs Istio's CRDs
