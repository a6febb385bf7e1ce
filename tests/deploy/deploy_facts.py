"""What every deployment file must agree on (ports, names, paths), and readers of those files
shared by the tests of tests/deploy/."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from inference_service.memory import parse_memory_budget
from voxserve.inference.v1 import inference_pb2
from voxserve.modelstore.v1 import modelstore_pb2

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD_DIR = GRAFANA_DIR / "dashboards"
K8S_DIR = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"

# The facts every file must agree with, keyed by Prometheus job name.
JOBS = ("model_service", "inference_service")
GRPC_PORT = {"model_service": 50051, "inference_service": 50052}
METRICS_PORT = {"model_service": 9101, "inference_service": 9102}
HEALTH_SERVICE = {
    "model_service": modelstore_pb2.DESCRIPTOR.services_by_name["ModelStore"].full_name,
    "inference_service": inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
}
CONSOLE_SCRIPT = {"model_service": "voxserve-models", "inference_service": "voxserve-inference"}
MAIN_MODULE = {"model_service": "model_service", "inference_service": "inference_service"}
COMPOSE_SERVICE = {"model_service": "model-store", "inference_service": "inference"}
# What clients of the inference service call: HAProxy, routing by model to the replicas.
ROUTER_COMPOSE_SERVICE = "haproxy"
K8S_WORKLOAD = {"model_service": ("StatefulSet", "model-store"), "inference_service": ("Deployment", "inference")}
DASHBOARD_JOB = {"model-store.json": "model_service", "inference.json": "inference_service"}
DEFAULT_GRACE_SECONDS = 20
# The HTTP gateway: not a gRPC service, so it has its own checks (test_deploy_gateway.py).
GATEWAY_JOB = "http_gateway"
GATEWAY_HTTP_PORT = 8080
GATEWAY_METRICS_PORT = 9103
GATEWAY_COMPOSE_SERVICE = "http-gateway"
GATEWAY_K8S_WORKLOAD = ("Deployment", "http-gateway")
MAIN_MODULE_GATEWAY = "voxserve_http"
SCRAPE_LABELS = frozenset({"job", "instance"})
# Distroless images (no shell, wget or curl) whose compose healthcheck is disabled.
NO_PROBE_IMAGES = frozenset({"otel-collector", "tempo", "loki", "promtail"})


def yaml_files() -> list[Path]:
    return sorted([COMPOSE_FILE, *DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def flags_of(argv: list[str]) -> dict[str, str]:
    """``--name=value`` / ``--name value`` arguments as a dict (last one wins)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = str(argv[i])
        if arg.startswith("--"):
            if "=" in arg:
                name, value = arg.split("=", 1)
            elif i + 1 < len(argv) and not str(argv[i + 1]).startswith("--"):
                name, value = arg, str(argv[i + 1])
                i += 1
            else:
                name, value = arg, ""
            out[name] = value
        i += 1
    return out


def expand_defaults(value: str) -> str:
    """Compose ``${VAR:-default}`` references replaced by their defaults."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", str(value))


def docker_bytes(quantity: str) -> int:
    """A compose ``mem_limit`` (``4g``): docker's units are binary."""
    match = re.fullmatch(r"(\d+)([bkmg]?)", quantity.lower())
    assert match, f"cannot read memory quantity {quantity!r}"
    return int(match.group(1)) * 1024 ** "bkmg".index(match.group(2) or "b")


def k8s_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``4Gi`` binary, ``4G`` decimal)."""
    match = re.fullmatch(r"(\d+)(([KMG])(i?))?", quantity)
    assert match, f"cannot read memory quantity {quantity!r}"
    if not match.group(2):
        return int(match.group(1))
    base = 1024 if match.group(4) else 1000
    return int(match.group(1)) * base ** ("KMG".index(match.group(3)) + 1)


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


def workload_of(objects: list[dict[str, Any]], job: str) -> dict[str, Any]:
    kind, name = K8S_WORKLOAD[job]
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def container_of(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def scrape_jobs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


def kubectl_path() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed; `kubectl kustomize` cannot build the manifests")
    return path


def load_service_config(job: str, argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The service's own config from a deployed command line and environment: its
    argparse flags, VOXSERVE_* env vars and validate() reject anything wrong."""
    module = importlib.import_module(f"{MAIN_MODULE.get(job, MAIN_MODULE_GATEWAY)}.__main__")
    for key in list(os.environ):
        if key.startswith("VOXSERVE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return module.parse_config([expand_defaults(arg) for arg in argv[1:]])


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    """A compose healthcheck's command: the items after CMD, or a CMD-SHELL string (also a plain
    string, which the inference replicas use) split as the shell would."""
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1])
    return [str(item) for item in test[1:]]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: expand_defaults(v) for k, v in (service.get("environment") or {}).items() if v is not None}


def k8s_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def assert_budget_fits(budget: str, limit: int) -> None:
    # A percentage is of the machine's RAM, not of the container's limit.
    assert "%" not in budget, "give the memory budget as a size"
    assert parse_memory_budget(budget, total=limit) < limit
