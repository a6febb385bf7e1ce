"""docker-compose.yml: services, volumes, healthchecks, log rotation, and the services load
the configuration compose passes them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_facts import (
    COMPOSE_SERVICE,
    CONSOLE_SCRIPT,
    DASHBOARD_DIR,
    DEFAULT_GRACE_SECONDS,
    GRAFANA_DIR,
    GRPC_PORT,
    JOBS,
    METRICS_PORT,
    NO_PROBE_IMAGES,
    PROMETHEUS_DIR,
    ROUTER_COMPOSE_SERVICE,
    assert_budget_fits,
    compose_env,
    docker_bytes,
    flags_of,
    healthcheck_argv,
    load_service_config,
)


def test_compose_services_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"model-store", "inference", "prometheus", "grafana"}
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = str(mount).split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts undeclared named volume {source!r}"
        assert "healthcheck" in service, f"{name} has no healthcheck"
        if service["healthcheck"].get("disable"):
            # Only images without any shell or HTTP client (the compose comment says so).
            assert name in NO_PROBE_IMAGES, f"{name} disables its healthcheck"
        else:
            test = service["healthcheck"]["test"]
            # A plain string is CMD-SHELL (the inference replicas': see docker-compose.yml).
            assert isinstance(test, str) or test[0] in ("CMD", "CMD-SHELL"), name
            if test[0] == "CMD":
                # podman-compose 1.0.3 joins CMD items unquoted: none may need shell quoting.
                assert all(shlex.quote(str(item)) == str(item) for item in test[1:]), name
        # Container log rotation (docker json-file; podman maps it to k8s-file with max-size).
        logging = service["logging"]
        assert logging["driver"] == "json-file" and logging["options"]["max-size"], name
        assert int(logging["options"]["max-file"]) >= 1, name


@pytest.mark.parametrize("job", JOBS)
def test_compose_voxserve_service(job: str, compose: dict[str, Any], pyproject: dict[str, Any]) -> None:
    service = compose["services"][COMPOSE_SERVICE[job]]
    command = [str(c) for c in service["command"]]
    assert command[0] == CONSOLE_SCRIPT[job]
    assert command[0] in pyproject["project"]["scripts"]
    flags = flags_of(command)
    assert flags["--port"] == str(GRPC_PORT[job])
    assert flags["--metrics-port"] == str(METRICS_PORT[job])
    assert flags["--host"] == "0.0.0.0"
    # The inference replicas publish nothing: clients reach them through haproxy, on the same port
    # (test_deploy_routing.py).
    publisher = compose["services"][ROUTER_COMPOSE_SERVICE] if job == "inference_service" else service
    published = [str(p).rsplit(":", 1)[-1] for p in publisher.get("ports", [])]
    assert str(GRPC_PORT[job]) in published
    assert job == "model_service" or not service.get("ports")
    health = healthcheck_argv(service)
    assert health[:3] == ["python", "-m", "voxserve_common.healthcheck"]
    assert health[-1] == f"127.0.0.1:{GRPC_PORT[job]}"
    grace = re.fullmatch(r"(\d+)s", str(service["stop_grace_period"]))
    assert grace and int(grace.group(1)) > DEFAULT_GRACE_SECONDS
    assert service["image"] == compose["services"]["model-store"]["image"], "one image for both services"
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"


def test_compose_inference_reads_the_store_volume_read_only(compose: dict[str, Any]) -> None:
    store = compose["services"]["model-store"]
    inference = compose["services"]["inference"]
    data_dir = flags_of(store["command"])["--data-dir"]
    store_mounts = {m.split(":")[1]: m.split(":") for m in store["volumes"]}
    assert data_dir in store_mounts, "the store's --data-dir must be a volume"
    volume = store_mounts[data_dir][0]
    assert len(store_mounts[data_dir]) == 2 or store_mounts[data_dir][2] == "rw"
    assert f"{volume}:{data_dir}:ro" in inference["volumes"]
    assert inference["depends_on"]["model-store"]["condition"] == "service_healthy"


def test_compose_hub_mirror_is_passed_through_only_when_set(compose: dict[str, Any]) -> None:
    env = compose["services"]["model-store"]["environment"]
    # A null value passes the caller's HF_ENDPOINT through and leaves it unset otherwise;
    # an empty string would override huggingface_hub's default endpoint with "".
    assert "HF_ENDPOINT" in env and env["HF_ENDPOINT"] is None


def test_compose_prometheus_and_grafana_mounts(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    config = flags_of(prometheus["command"])["--config.file"]
    assert (PROMETHEUS_DIR / Path(config).relative_to("/etc/prometheus")).is_file()

    grafana = compose["services"]["grafana"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "voxserve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(mounts["./deploy/grafana/dashboards"])
    assert (DASHBOARD_DIR / Path(home).name).is_file()


def test_compose_services_load_their_config(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    store_service = compose["services"]["model-store"]
    store = load_service_config("model_service", store_service["command"], compose_env(store_service), monkeypatch)
    assert (store.host, store.port, store.metrics_port) == (
        "0.0.0.0",
        GRPC_PORT["model_service"],
        METRICS_PORT["model_service"],
    )
    assert str(store.data_dir) in [m.split(":")[1] for m in store_service["volumes"]]

    service = compose["services"]["inference"]
    inference = load_service_config("inference_service", service["command"], compose_env(service), monkeypatch)
    assert (inference.host, inference.port) == ("0.0.0.0", GRPC_PORT["inference_service"])
    assert inference.metrics_port == METRICS_PORT["inference_service"]
    assert inference.model_store == f"model-store:{store.port}"
    assert inference.store_access == "shared"
    assert inference.shared_store_dir == store.data_dir
    assert f"{store.data_dir}:ro" in [m.split(":", 1)[1] for m in service["volumes"] if ":" in m]
    assert str(inference.cache_dir) in service["volumes"], "each replica its own cache dir (an anonymous volume)"
    assert_budget_fits(inference.memory_budget, docker_bytes(service["mem_limit"]))
