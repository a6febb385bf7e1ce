"""The HTTP gateway in the deployment: compose and Kubernetes run it against both services,
Prometheus scrapes it and the service-down alert covers it."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_facts import (
    COMPOSE_SERVICE,
    GATEWAY_COMPOSE_SERVICE,
    GATEWAY_HTTP_PORT,
    GATEWAY_JOB,
    GATEWAY_K8S_WORKLOAD,
    GATEWAY_METRICS_PORT,
    GRPC_PORT,
    K8S_WORKLOAD,
    PROMETHEUS_DIR,
    ROUTER_COMPOSE_SERVICE,
    compose_env,
    container_of,
    k8s_env,
    kustomization,
    load_service_config,
    scrape_jobs,
)
from tests.deploy.promql import up_selectors


def test_compose_runs_the_gateway_against_both_services(
    compose: dict[str, Any], pyproject: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    service = compose["services"][GATEWAY_COMPOSE_SERVICE]
    command = [str(c) for c in service["command"]]
    assert command[0] == "voxserve-http" and command[0] in pyproject["project"]["scripts"]
    assert service["image"] == compose["services"]["model-store"]["image"], "one image for every service"
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    config = load_service_config(GATEWAY_JOB, command, compose_env(service), monkeypatch)
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", GATEWAY_HTTP_PORT, GATEWAY_METRICS_PORT)
    # Through HAProxy, which routes each call to the replica that holds its model.
    assert config.inference == f"{ROUTER_COMPOSE_SERVICE}:{GRPC_PORT['inference_service']}"
    assert config.model_store == f"{COMPOSE_SERVICE['model_service']}:{GRPC_PORT['model_service']}"
    published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
    assert str(GATEWAY_HTTP_PORT) in published
    for backend in (COMPOSE_SERVICE["model_service"], ROUTER_COMPOSE_SERVICE):
        assert service["depends_on"][backend]["condition"] == "service_healthy"
    health = " ".join(service["healthcheck"]["test"])
    # HTTPS (the gateway serves --tls-cert), trusting the dev CA.
    assert config.tls_cert is not None and config.tls_key is not None
    assert f"https://127.0.0.1:{GATEWAY_HTTP_PORT}/healthz" in health
    assert "cafile='/run/secrets/ca.pem'" in health
    grace = re.fullmatch(r"(\d+)s", str(service["stop_grace_period"]))
    assert grace and int(grace.group(1)) > config.grace_seconds


def test_prometheus_scrapes_the_gateway(prometheus_config: dict[str, Any], k8s_objects: list[dict[str, Any]]) -> None:
    job = scrape_jobs(prometheus_config)[GATEWAY_JOB]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"{GATEWAY_COMPOSE_SERVICE}:{GATEWAY_METRICS_PORT}"]
    k8s = scrape_jobs(yaml.safe_load((PROMETHEUS_DIR / "prometheus-k8s.yml").read_text()))[GATEWAY_JOB]
    (sd,) = k8s["dns_sd_configs"]
    assert sd["port"] == GATEWAY_METRICS_PORT
    (name,) = sd["names"]
    service_name, namespace = name.split(".")[:2]
    assert namespace == kustomization()["namespace"]
    (service,) = [o for o in k8s_objects if o["kind"] == "Service" and o["metadata"]["name"] == service_name]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    (workload,) = [
        o
        for o in k8s_objects
        if o["kind"] == GATEWAY_K8S_WORKLOAD[0] and o["metadata"]["name"] == GATEWAY_K8S_WORKLOAD[1]
    ]
    assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]


def test_k8s_gateway_workload(k8s_objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    kind, name = GATEWAY_K8S_WORKLOAD
    (workload,) = [o for o in k8s_objects if o["kind"] == kind and o["metadata"]["name"] == name]
    container = container_of(workload)
    assert "command" not in container, "args keep the image's tini entrypoint"
    config = load_service_config(GATEWAY_JOB, container["args"], k8s_env(container, k8s_objects), monkeypatch)
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", GATEWAY_HTTP_PORT, GATEWAY_METRICS_PORT)
    services = {o["metadata"]["name"]: o for o in k8s_objects if o["kind"] == "Service"}
    for address, job in ((config.inference, "inference_service"), (config.model_store, "model_service")):
        host, port = address.rsplit(":", 1)
        assert host == K8S_WORKLOAD[job][1] and host in services
        assert int(port) == GRPC_PORT[job]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": GATEWAY_HTTP_PORT, "metrics": GATEWAY_METRICS_PORT}
    https = {"port": "http", "scheme": "HTTPS"}
    assert config.tls_cert is not None
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", **https}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", **https}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", **https}
    spec = workload["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert spec["terminationGracePeriodSeconds"] > config.grace_seconds + int(pre_stop[1])
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(GATEWAY_METRICS_PORT)
    assert annotations["voxserve.io/metrics-job"] == GATEWAY_JOB
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "/tmp" in [m["mountPath"] for m in container["volumeMounts"]], "uploads spool to /tmp (read-only root)"
    service = services[name]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": (GATEWAY_HTTP_PORT, "http"),
        "metrics": (GATEWAY_METRICS_PORT, "metrics"),
    }
    assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]


def test_service_down_alert_covers_the_gateway(alert_rules: list[dict[str, Any]]) -> None:
    (rule,) = [r for r in alert_rules if r["alert"] == "VoxserveServiceDown"]
    (selector,) = up_selectors(rule["expr"])
    op, value = selector.value("job") or ("", "")
    assert op == "=~" and GATEWAY_JOB in value.split("|")
