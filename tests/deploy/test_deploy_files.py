"""Every deployment file parses and the expected ones exist; the readers the deploy tests
use (flags, memory quantities) read what they should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.deploy.deploy_facts import (
    COMPOSE_FILE,
    DASHBOARD_DIR,
    DASHBOARD_JOB,
    DEPLOY,
    DOCKERFILE,
    GRAFANA_DIR,
    K8S_DIR,
    PROMETHEUS_DIR,
    ROOT,
    docker_bytes,
    expand_defaults,
    flags_of,
    k8s_bytes,
    load_all,
    yaml_files,
)


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.json")), ids=lambda p: str(p.relative_to(ROOT)))
def test_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


def test_the_expected_files_exist() -> None:
    expected = [
        COMPOSE_FILE,
        DOCKERFILE,
        DEPLOY / "Dockerfile.dockerignore",
        DEPLOY / "README.md",
        PROMETHEUS_DIR / "prometheus.yml",
        PROMETHEUS_DIR / "alerts.yml",
        GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml",
        GRAFANA_DIR / "provisioning" / "dashboards" / "voxserve.yml",
        *(DASHBOARD_DIR / name for name in DASHBOARD_JOB),
        K8S_DIR / "kustomization.yaml",
    ]
    missing = [str(p.relative_to(ROOT)) for p in expected if not p.is_file()]
    assert not missing


def test_memory_quantities() -> None:
    assert docker_bytes("4g") == 4 * 1024**3
    assert docker_bytes("512m") == 512 * 1024**2
    assert k8s_bytes("4Gi") == 4 * 1024**3
    assert k8s_bytes("4G") == 4 * 1000**3
    assert k8s_bytes("512Mi") == 512 * 1024**2


def test_flag_parsing() -> None:
    assert flags_of(["x", "--port=1", "--host", "h", "--flag"]) == {"--port": "1", "--host": "h", "--flag": ""}
    assert expand_defaults("--max-models=${VOXSERVE_MAX_MODELS:-4}") == "--max-models=4"
