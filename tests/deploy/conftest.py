"""Fixtures of the deployment tests: the deployed files, read once per test module, and what
the services export."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from inference_service.metrics import InferenceMetrics
from model_service.metrics import ModelStoreMetrics
from tests.deploy.deploy_facts import (
    COMPOSE_FILE,
    DASHBOARD_DIR,
    DASHBOARD_JOB,
    K8S_DIR,
    PROMETHEUS_DIR,
    ROOT,
    kustomization,
    load_all,
)
from tests.deploy.promql import Series, exported_series


@pytest.fixture(scope="session")
def dev_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh directory made by scripts/make_dev_secrets.sh, as a deployment would use it."""
    directory = tmp_path_factory.mktemp("deploy-secrets") / "secrets"
    subprocess.run(["bash", str(ROOT / "scripts" / "make_dev_secrets.sh"), str(directory)], check=True, timeout=120)
    return directory


@pytest.fixture(scope="module")
def exported() -> dict[str, dict[str, Series]]:
    return {
        "model_service": exported_series(ModelStoreMetrics()),
        "inference_service": exported_series(InferenceMetrics()),
    }


@pytest.fixture(scope="module")
def all_series(exported: dict[str, dict[str, Series]]) -> dict[str, Series]:
    return {**exported["model_service"], **exported["inference_service"]}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    return {name: json.loads((DASHBOARD_DIR / name).read_text()) for name in DASHBOARD_JOB}


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for resource in kustomization()["resources"]:
        objects += load_all(K8S_DIR / resource)
    return objects
