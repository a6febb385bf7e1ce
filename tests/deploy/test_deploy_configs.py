"""Deployment configuration: every file parses, ports and names agree across compose,
Prometheus, Grafana and Kubernetes, dashboards and alerts query only series the
services export, and promtool accepts (and unit-tests) the Prometheus files."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from inference_service.memory import parse_memory_budget
from inference_service.metrics import InferenceMetrics
from model_service.metrics import ModelStoreMetrics
from model_service.state import ModelState
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
K8S_WORKLOAD = {"model_service": ("StatefulSet", "model-store"), "inference_service": ("Deployment", "inference")}
DASHBOARD_JOB = {"model-store.json": "model_service", "inference.json": "inference_service"}
DEFAULT_GRACE_SECONDS = 20
# The HTTP gateway: not a gRPC service, so it has its own checks below.
GATEWAY_JOB = "http_gateway"
GATEWAY_HTTP_PORT = 8080
GATEWAY_METRICS_PORT = 9103
GATEWAY_COMPOSE_SERVICE = "http-gateway"
GATEWAY_K8S_WORKLOAD = ("Deployment", "http-gateway")
MAIN_MODULE_GATEWAY = "voxserve_http"
SCRAPE_LABELS = frozenset({"job", "instance"})
# Distroless images (no shell, wget or curl) whose compose healthcheck is disabled.
NO_PROBE_IMAGES = frozenset({"otel-collector", "tempo", "loki", "promtail"})


# --- what the services export -------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One exposed series name (``voxserve_x_total``) and the labels it can carry."""

    family: str
    labels: frozenset[str]


def _wrappers(obj: object) -> Iterator[MetricWrapperBase]:
    for value in vars(obj).values():
        if isinstance(value, MetricWrapperBase):
            yield value
        elif hasattr(value, "__dict__") and not isinstance(value, CollectorRegistry):
            yield from _wrappers(value)


def _exported(metrics: ModelStoreMetrics | InferenceMetrics) -> dict[str, Series]:
    """Series names as Prometheus stores them, from the registry's metric families.

    Labelled metrics without samples render nothing, so names come from the families
    (``registry.collect()``) plus the suffixes the text format adds per type.
    """
    # Label names are not part of a family without samples; read them off the metric
    # objects, and check below that those are exactly the registry's families.
    labels_by_family = {w._name: frozenset(w._labelnames) for w in _wrappers(metrics)}
    out: dict[str, Series] = {}
    families = list(metrics.registry.collect())
    assert {f.name for f in families} == set(labels_by_family), "metric objects and registry disagree"
    for family in families:
        labels = labels_by_family[family.name] | SCRAPE_LABELS
        if family.type == "counter":
            names = {f"{family.name}_total": labels, f"{family.name}_created": labels}
        elif family.type == "histogram":
            names = {
                f"{family.name}_bucket": labels | {"le"},
                f"{family.name}_sum": labels,
                f"{family.name}_count": labels,
                f"{family.name}_created": labels,
            }
        elif family.type == "gauge":
            names = {family.name: labels}
        else:
            raise AssertionError(f"unexpected metric type {family.type} of {family.name}")
        for name, series_labels in names.items():
            out[name] = Series(family.name, series_labels)
    return out


@pytest.fixture(scope="module")
def exported() -> dict[str, dict[str, Series]]:
    return {
        "model_service": _exported(ModelStoreMetrics()),
        "inference_service": _exported(InferenceMetrics()),
    }


@pytest.fixture(scope="module")
def all_series(exported: dict[str, dict[str, Series]]) -> dict[str, Series]:
    return {**exported["model_service"], **exported["inference_service"]}


def test_exported_series_include_counter_and_histogram_suffixes(all_series: dict[str, Series]) -> None:
    assert "voxserve_rpc_requests_total" in all_series
    assert "voxserve_rpc_requests" not in all_series
    assert "le" in all_series["voxserve_real_time_factor_bucket"].labels
    assert "voxserve_real_time_factor" not in all_series
    assert "voxserve_download_queue_length" in all_series


@pytest.mark.parametrize("make", [ModelStoreMetrics, InferenceMetrics])
def test_exported_series_are_what_the_registry_renders(make: type[ModelStoreMetrics | InferenceMetrics]) -> None:
    metrics = make()
    for wrapper in _wrappers(metrics):
        child = wrapper.labels(*["x"] * len(wrapper._labelnames)) if wrapper._labelnames else wrapper
        if hasattr(child, "observe"):
            child.observe(1)
        elif hasattr(child, "inc"):
            child.inc()
    text = generate_latest(metrics.registry).decode()
    rendered = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert rendered == set(_exported(metrics))


# --- PromQL parsing -----------------------------------------------------------------

_SELECTOR = re.compile(r"\b(voxserve_[A-Za-z0-9_]*)\b(\{[^}]*\})?")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]

    def value(self, label: str) -> tuple[str, str] | None:
        for name, op, value in self.matchers:
            if name == label:
                return op, value
        return None


def selectors(expr: str) -> list[Selector]:
    return [Selector(m.group(1), tuple(_MATCHER.findall(m.group(2) or ""))) for m in _SELECTOR.finditer(expr)]


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in _GROUPING.findall(expr) for label in group.split(",") if label.strip()}


def check_expr(expr: str, series: dict[str, Series]) -> list[str]:
    """Problems with one PromQL expression: unknown series, unknown label names."""
    problems = []
    found = selectors(expr)
    known_labels: set[str] = set(SCRAPE_LABELS)
    for sel in found:
        if sel.metric not in series:
            problems.append(f"{sel.metric} is not exported (expr: {expr})")
            continue
        known_labels |= series[sel.metric].labels
        for label, _, _ in sel.matchers:
            if label not in series[sel.metric].labels:
                problems.append(f"{sel.metric} has no label {label!r} (expr: {expr})")
    if found:
        for label in grouping_labels(expr) - known_labels:
            problems.append(f"grouping by {label!r}, which no series in the expression has (expr: {expr})")
    return problems


def test_check_expr_reports_unknown_metrics_and_labels(all_series: dict[str, Series]) -> None:
    assert check_expr('sum by (model_id) (rate(voxserve_cache_hits_total{job="x"}[5m]))', all_series) == []
    assert check_expr("voxserve_cache_hits", all_series)  # counter without _total
    assert check_expr('voxserve_cache_hits_total{state="x"}', all_series)
    assert check_expr("sum by (state) (voxserve_cache_hits_total)", all_series)
    assert check_expr("voxserve_no_such_metric", all_series)


# --- files --------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted([COMPOSE_FILE, *DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


def _load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    docs = _load_all(path)
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


def _flags(argv: list[str]) -> dict[str, str]:
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


def _expand(value: str) -> str:
    """Compose ``${VAR:-default}`` references replaced by their defaults."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", str(value))


def _docker_bytes(quantity: str) -> int:
    """A compose ``mem_limit`` (``4g``): docker's units are binary."""
    match = re.fullmatch(r"(\d+)([bkmg]?)", quantity.lower())
    assert match, f"cannot read memory quantity {quantity!r}"
    return int(match.group(1)) * 1024 ** "bkmg".index(match.group(2) or "b")


def _k8s_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``4Gi`` binary, ``4G`` decimal)."""
    match = re.fullmatch(r"(\d+)(([KMG])(i?))?", quantity)
    assert match, f"cannot read memory quantity {quantity!r}"
    if not match.group(2):
        return int(match.group(1))
    base = 1024 if match.group(4) else 1000
    return int(match.group(1)) * base ** ("KMG".index(match.group(3)) + 1)


def test_memory_quantities() -> None:
    assert _docker_bytes("4g") == 4 * 1024**3
    assert _docker_bytes("512m") == 512 * 1024**2
    assert _k8s_bytes("4Gi") == 4 * 1024**3
    assert _k8s_bytes("4G") == 4 * 1000**3
    assert _k8s_bytes("512Mi") == 512 * 1024**2


def test_flag_parsing() -> None:
    assert _flags(["x", "--port=1", "--host", "h", "--flag"]) == {"--port": "1", "--host": "h", "--flag": ""}
    assert _expand("--max-models=${VOXSERVE_MAX_MODELS:-4}") == "--max-models=4"


# --- docker-compose.yml -------------------------------------------------------------


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
            assert test[0] in ("CMD", "CMD-SHELL"), name
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
    flags = _flags(command)
    assert flags["--port"] == str(GRPC_PORT[job])
    assert flags["--metrics-port"] == str(METRICS_PORT[job])
    assert flags["--host"] == "0.0.0.0"
    published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
    assert str(GRPC_PORT[job]) in published
    health = service["healthcheck"]["test"]
    assert health[0] == "CMD"
    assert "voxserve_common.healthcheck" in health
    assert health[-1] == f"127.0.0.1:{GRPC_PORT[job]}"
    grace = re.fullmatch(r"(\d+)s", str(service["stop_grace_period"]))
    assert grace and int(grace.group(1)) > DEFAULT_GRACE_SECONDS
    assert service["image"] == compose["services"]["model-store"]["image"], "one image for both services"
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"


def test_compose_inference_reads_the_store_volume_read_only(compose: dict[str, Any]) -> None:
    store = compose["services"]["model-store"]
    inference = compose["services"]["inference"]
    data_dir = _flags(store["command"])["--data-dir"]
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
    config = _flags(prometheus["command"])["--config.file"]
    assert (PROMETHEUS_DIR / Path(config).relative_to("/etc/prometheus")).is_file()

    grafana = compose["services"]["grafana"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "voxserve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(mounts["./deploy/grafana/dashboards"])
    assert (DASHBOARD_DIR / Path(home).name).is_file()


# --- Prometheus ---------------------------------------------------------------------


def _scrape_jobs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_prometheus_scrapes_both_services(prometheus_config: dict[str, Any], compose: dict[str, Any]) -> None:
    jobs = _scrape_jobs(prometheus_config)
    for job in JOBS:
        targets = [t for sc in jobs[job]["static_configs"] for t in sc["targets"]]
        assert targets == [f"{COMPOSE_SERVICE[job]}:{METRICS_PORT[job]}"]
        assert COMPOSE_SERVICE[job] in compose["services"]
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
    for rule_file in prometheus_config["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file()


def test_prometheus_k8s_discovers_pods_through_headless_services(k8s_objects: list[dict[str, Any]]) -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus-k8s.yml").read_text())
    jobs = _scrape_jobs(config)
    namespace = _kustomization()["namespace"]
    services = {o["metadata"]["name"]: o for o in k8s_objects if o["kind"] == "Service"}
    for job in JOBS:
        (sd,) = jobs[job]["dns_sd_configs"]
        assert sd["port"] == METRICS_PORT[job]
        (name,) = sd["names"]
        service_name, ns = name.split(".")[:2]
        assert ns == namespace
        service = services[service_name]
        assert service["spec"]["clusterIP"] == "None"
        # A pod that fails its probes must stay a target, so it shows up as down.
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert METRICS_PORT[job] in [p["port"] for p in service["spec"]["ports"]]
        assert service["spec"]["selector"] == _workload(k8s_objects, job)["spec"]["selector"]["matchLabels"]


def test_grafana_rate_interval_matches_scrape_interval(prometheus_config: dict[str, Any]) -> None:
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["jsonData"]["timeInterval"] == prometheus_config["global"]["scrape_interval"]
    assert source["url"] == "http://prometheus:9090"
    assert source["type"] == "prometheus"


def test_alert_rules_are_complete(alert_rules: list[dict[str, Any]]) -> None:
    names = [rule["alert"] for rule in alert_rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in alert_rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    required = {
        "VoxserveServiceDown",
        "VoxserveDownloadFailuresRising",
        "VoxserveVerificationFailures",
        "VoxserveDownloadQueueStuck",
        "VoxserveCacheMemoryNearBudget",
        "VoxserveRpcErrorRatioHigh",
        "VoxserveRealTimeFactorHigh",
        "VoxserveTimeToFirstSegmentHigh",
    }
    assert required <= set(names)


def test_alert_rules_query_exported_series(alert_rules: list[dict[str, Any]], all_series: dict[str, Series]) -> None:
    problems = [p for rule in alert_rules for p in check_expr(rule["expr"], all_series)]
    assert not problems


def test_alert_rules_select_scraped_jobs(alert_rules: list[dict[str, Any]], prometheus_config: dict[str, Any]) -> None:
    scraped = set(_scrape_jobs(prometheus_config))
    for rule in alert_rules:
        for name, op, value in _MATCHER.findall(rule["expr"]):
            if name == "job":
                values = value.split("|") if op == "=~" else [value]
                assert set(values) <= scraped, f"{rule['alert']} selects job {value!r}"


def test_every_alert_has_a_firing_unit_test(alert_rules: list[dict[str, Any]]) -> None:
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts.test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fired = {
        case["alertname"]
        for group in tests["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    untested = {rule["alert"] for rule in alert_rules} - fired
    assert not untested


def _code_values(expr: str) -> Iterator[str]:
    for name, _, value in _MATCHER.findall(expr):
        if name == "code":
            yield from value.split("|")


def _all_exprs(alert_rules: list[dict[str, Any]], dashboards: dict[str, dict[str, Any]]) -> list[str]:
    return [rule["expr"] for rule in alert_rules] + [
        target["expr"] for board in dashboards.values() for _, target in _targets(board)
    ]


def test_status_code_matchers_name_real_grpc_codes(
    alert_rules: list[dict[str, Any]], dashboards: dict[str, dict[str, Any]]
) -> None:
    # voxserve_common.server labels voxserve_rpc_requests by grpc.StatusCode.name.
    names = {code.name for code in grpc.StatusCode}
    used = {value for expr in _all_exprs(alert_rules, dashboards) for value in _code_values(expr)}
    assert used and used <= names


def test_model_state_matchers_name_real_states(
    alert_rules: list[dict[str, Any]], dashboards: dict[str, dict[str, Any]]
) -> None:
    states = {state.value for state in ModelState}
    for expr in _all_exprs(alert_rules, dashboards):
        for sel in selectors(expr):
            matcher = sel.value("state")
            if sel.metric == "voxserve_models" and matcher is not None:
                assert matcher[1] in states, expr


# --- Grafana ------------------------------------------------------------------------


def _targets(board: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) of every Prometheus query (Loki log panels are checked elsewhere)."""
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            if inner.get("type") == "logs":
                continue
            for target in inner.get("targets", []):
                yield inner, target


def test_dashboards_are_generated_from_the_script() -> None:
    spec = importlib.util.spec_from_file_location("generate_dashboards", GRAFANA_DIR / "generate_dashboards.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    try:
        spec.loader.exec_module(module)
        rendered = module.render()
    finally:
        del sys.modules[spec.name]
    assert set(rendered) == set(DASHBOARD_JOB) == {p.name for p in DASHBOARD_DIR.glob("*.json")}
    for name, text in rendered.items():
        assert (DASHBOARD_DIR / name).read_text() == text, f"{name} is stale: run deploy/grafana/generate_dashboards.py"


@pytest.mark.parametrize("name", sorted(DASHBOARD_JOB))
def test_dashboard_structure(name: str, dashboards: dict[str, dict[str, Any]]) -> None:
    board = dashboards[name]
    job = DASHBOARD_JOB[name]
    assert board["uid"] and len(board["uid"]) <= 40
    assert 36 <= board["schemaVersion"] <= 41
    assert board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["multi"] and instance["includeAll"]
    assert f'job="{job}"' in instance["definition"]

    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"{panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        if panel["type"] == "logs":
            # Log panels read the provisioned Loki data source (tests/deploy/test_observability_configs.py).
            assert panel["datasource"] == {"type": "loki", "uid": "loki"}
            assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["fieldConfig"]["defaults"]["unit"]


def test_dashboard_uids_are_unique(dashboards: dict[str, dict[str, Any]]) -> None:
    uids = [board["uid"] for board in dashboards.values()]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("name", sorted(DASHBOARD_JOB))
def test_dashboard_queries_exported_series_of_its_service(
    name: str, dashboards: dict[str, dict[str, Any]], exported: dict[str, dict[str, Series]]
) -> None:
    job = DASHBOARD_JOB[name]
    problems = []
    for panel, target in _targets(dashboards[name]):
        expr = target["expr"]
        problems += [f"{panel['title']}: {p}" for p in check_expr(expr, exported[job])]
        for sel in [*selectors(expr), *_up_selectors(expr)]:
            if sel.value("job") != ("=", job) or sel.value("instance") != ("=~", "$instance"):
                problems.append(f'{panel["title"]}: {sel.metric} must select job="{job}", instance=~"$instance"')
    assert not problems


def _up_selectors(expr: str) -> list[Selector]:
    return [Selector("up", tuple(_MATCHER.findall(m))) for m in re.findall(r"\bup(\{[^}]*\})", expr)]


@pytest.mark.parametrize("name", sorted(DASHBOARD_JOB))
def test_dashboard_shows_every_metric_of_its_service(
    name: str, dashboards: dict[str, dict[str, Any]], exported: dict[str, dict[str, Series]]
) -> None:
    shown = {
        exported[DASHBOARD_JOB[name]][sel.metric].family
        for _, target in _targets(dashboards[name])
        for sel in selectors(target["expr"])
        if sel.metric in exported[DASHBOARD_JOB[name]]
    }
    families = {s.family for s in exported[DASHBOARD_JOB[name]].values()}
    assert families - shown == set()


# --- Kubernetes ---------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for resource in _kustomization()["resources"]:
        objects += _load_all(K8S_DIR / resource)
    return objects


def _workload(objects: list[dict[str, Any]], job: str) -> dict[str, Any]:
    kind, name = K8S_WORKLOAD[job]
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_k8s_namespace(k8s_objects: list[dict[str, Any]]) -> None:
    namespaces = [o["metadata"]["name"] for o in k8s_objects if o["kind"] == "Namespace"]
    assert namespaces == [_kustomization()["namespace"]]


@pytest.mark.parametrize("job", JOBS)
def test_k8s_workload(job: str, k8s_objects: list[dict[str, Any]]) -> None:
    workload = _workload(k8s_objects, job)
    pod = workload["spec"]["template"]
    container = _container(workload)
    args = container["args"]
    assert "command" not in container, "args keep the image's tini entrypoint"
    assert args[0] == CONSOLE_SCRIPT[job]
    flags = _flags(args)
    assert flags["--port"] == str(GRPC_PORT[job])
    assert flags["--metrics-port"] == str(METRICS_PORT[job])

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT[job], "metrics": METRICS_PORT[job]}

    # Exec probes with the healthcheck module over mutual TLS (native gRPC probes have no TLS):
    # readiness asks for the service's own name, startup and liveness for "" (the process).
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "voxserve_common.healthcheck"], probe
        flags = _flags(command)
        for flag in ("--tls-ca", "--tls-cert", "--tls-key"):
            assert str(Path(flags[flag]).parent) in mounted, f"{probe} {flag} is not on a mounted volume"
        positional = [c for c in command[3:] if not c.startswith("--")]
        expected = [f"127.0.0.1:{GRPC_PORT[job]}"] + ([HEALTH_SERVICE[job]] if probe == "readinessProbe" else [])
        assert positional == expected, probe
        assert container[probe]["timeoutSeconds"] >= 5, "a Python start-up on a loaded node takes a while"

    spec = pod["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pause = int(pre_stop[1]) if pre_stop[0] == "sleep" else 0
    assert spec["terminationGracePeriodSeconds"] > DEFAULT_GRACE_SECONDS + pause

    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    assert _k8s_bytes(resources["requests"]["memory"]) <= _k8s_bytes(resources["limits"]["memory"])

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT[job])
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["voxserve.io/metrics-job"] == job

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    config_maps = {o["metadata"]["name"] for o in k8s_objects if o["kind"] == "ConfigMap"}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] in config_maps


@pytest.mark.parametrize("job", JOBS)
def test_k8s_service_exposes_the_ports(job: str, k8s_objects: list[dict[str, Any]]) -> None:
    _, name = K8S_WORKLOAD[job]
    (service,) = [o for o in k8s_objects if o["kind"] == "Service" and o["metadata"]["name"] == name]
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports["grpc"] == (GRPC_PORT[job], "grpc")
    assert ports["metrics"] == (METRICS_PORT[job], "metrics")
    assert service["spec"]["selector"] == _workload(k8s_objects, job)["spec"]["selector"]["matchLabels"]


def test_k8s_store_data_dir_is_the_persistent_volume(k8s_objects: list[dict[str, Any]]) -> None:
    store = _workload(k8s_objects, "model_service")
    data_dir = _flags(_container(store)["args"])["--data-dir"]
    mounts = {m["mountPath"]: m["name"] for m in _container(store)["volumeMounts"]}
    volumes = {v["name"]: v for v in store["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts[data_dir]]["persistentVolumeClaim"]["claimName"]
    claims = {o["metadata"]["name"] for o in k8s_objects if o["kind"] == "PersistentVolumeClaim"}
    assert claim in claims
    assert store["spec"]["replicas"] == 1, "one store owns the volume"
    headless = store["spec"]["serviceName"]
    assert any(o["kind"] == "Service" and o["metadata"]["name"] == headless for o in k8s_objects)


def test_k8s_shared_models_component_mounts_the_store_dir(k8s_objects: list[dict[str, Any]]) -> None:
    store = _workload(k8s_objects, "model_service")
    store_dir = _flags(_container(store)["args"])["--data-dir"]
    (claim,) = [
        v["persistentVolumeClaim"]["claimName"]
        for v in store["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    component = yaml.safe_load((K8S_DIR / "components" / "shared-models" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    patches = [yaml.safe_load(p["patch"]) for p in component["patches"]]
    (claim_patch,) = [p for p in patches if isinstance(p, list)]
    assert claim_patch == [{"op": "replace", "path": "/spec/accessModes", "value": ["ReadWriteMany"]}]
    (deployment,) = [p for p in patches if isinstance(p, dict) and p["kind"] == "Deployment"]
    assert deployment["metadata"]["name"] == K8S_WORKLOAD["inference_service"][1]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == _container(_workload(k8s_objects, "inference_service"))["name"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"VOXSERVE_STORE_ACCESS": "shared", "VOXSERVE_SHARED_STORE_DIR": store_dir}
    assert container["volumeMounts"] == [{"name": "models", "mountPath": store_dir, "readOnly": True}]
    assert pod["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed; `kubectl kustomize` cannot build the manifests")
    return path


def test_kustomize_builds_base_and_shared_models(tmp_path: Path) -> None:
    kubectl = _kubectl()
    base = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60)
    assert base.returncode == 0, base.stderr
    namespaced = [doc for doc in yaml.safe_load_all(base.stdout) if doc["kind"] != "Namespace"]
    assert {doc["metadata"].get("namespace") for doc in namespaced} == {_kustomization()["namespace"]}

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(K8S_DIR, overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [rel],
                "components": [f"{rel}/components/shared-models"],
            }
        )
    )
    built = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built.stdout)}
    assert docs[("PersistentVolumeClaim", "voxserve-models")]["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = docs[("Deployment", "inference")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VOXSERVE_SHARED_STORE_DIR"] == "/var/lib/voxserve/models"
    assert env["VOXSERVE_STORE_ACCESS"] == "shared"
    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "voxserve-models", "readOnly": True}]


# --- image --------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile(pyproject: dict[str, Any]) -> None:
    instructions = _dockerfile_instructions()
    runs = [args for op, args in instructions if op == "RUN"]
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    torch_step = next(i for i, r in enumerate(runs) if torch_pin in r)
    # The CPU index is the default of a build argument (a local wheel folder can replace it).
    args = [a for op, a in instructions if op == "ARG"]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args
    assert '--index-url "$TORCH_INDEX_URL"' in runs[torch_step]
    # The dependencies come from the lock, every one with its hash, as in scripts/setup.sh.
    deps_step = next(i for i, r in enumerate(runs) if "-r requirements/runtime.lock" in r)
    assert "--require-hashes" in runs[deps_step]
    assert "requirements/runtime.lock ./requirements/" in [a for op, a in instructions if op == "COPY"]
    assert "torch==2.13.0+cpu" in (ROOT / "requirements" / "runtime.lock").read_text()
    project_step = next(
        i for i, r in enumerate(runs) if re.search(r"pip wheel --no-deps --wheel-dir /wheels \.(\s|$)", r)
    )
    assert torch_step < deps_step < project_step, "torch from the CPU index, then the dependencies, then voxserve"
    # The runtime gets the dependencies' venv (cached while pyproject.toml is unchanged) and
    # voxserve's wheel on top, without its dependencies.
    copies = [a for op, a in instructions if op == "COPY"]
    assert "--from=deps /opt/venv /opt/venv" in copies and "--from=build /wheels /tmp/wheels" in copies
    assert any("pip install --no-deps" in r and "/tmp/wheels/*.whl" in r for r in runs)

    assert re.search(r"python:3\.11-slim", DOCKERFILE.read_text())
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    (healthcheck,) = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert "python -m voxserve_common.healthcheck" in healthcheck
    exposed = {int(p) for op, args in instructions if op == "EXPOSE" for p in args.split()}
    assert exposed == {*GRPC_PORT.values(), *METRICS_PORT.values(), GATEWAY_HTTP_PORT, GATEWAY_METRICS_PORT}
    (cmd,) = [json.loads(args) for op, args in instructions if op == "CMD"]
    assert cmd[0] in pyproject["project"]["scripts"]


def test_docker_context_includes_every_package(pyproject: dict[str, Any]) -> None:
    allowed = {
        line[1:].strip("/")
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.parent.name
        for p in ROOT.glob("*/__init__.py")
        if any(re.fullmatch(pat.replace("*", ".*"), p.parent.name) for pat in patterns)
    }
    assert packages and packages <= allowed
    assert "pyproject.toml" in allowed
    readme = pyproject["project"].get("readme")
    if readme:
        assert readme in allowed


def test_healthcheck_module_exists() -> None:
    # The image's HEALTHCHECK, compose healthchecks and deploy/README.md run it.
    assert importlib.util.find_spec("voxserve_common.healthcheck") is not None


# --- the services read what the files pass -----------------------------------------


def _load_service_config(job: str, argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The service's own config from a deployed command line and environment: its
    argparse flags, VOXSERVE_* env vars and validate() reject anything wrong."""
    module = importlib.import_module(f"{MAIN_MODULE.get(job, MAIN_MODULE_GATEWAY)}.__main__")
    for key in list(os.environ):
        if key.startswith("VOXSERVE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return module.parse_config([_expand(arg) for arg in argv[1:]])


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: _expand(v) for k, v in (service.get("environment") or {}).items() if v is not None}


def _k8s_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _assert_budget_fits(budget: str, limit: int) -> None:
    # A percentage is of the machine's RAM, not of the container's limit.
    assert "%" not in budget, "give the memory budget as a size"
    assert parse_memory_budget(budget, total=limit) < limit


def test_compose_services_load_their_config(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    store_service = compose["services"]["model-store"]
    store = _load_service_config("model_service", store_service["command"], _compose_env(store_service), monkeypatch)
    assert (store.host, store.port, store.metrics_port) == (
        "0.0.0.0",
        GRPC_PORT["model_service"],
        METRICS_PORT["model_service"],
    )
    assert str(store.data_dir) in [m.split(":")[1] for m in store_service["volumes"]]

    service = compose["services"]["inference"]
    inference = _load_service_config("inference_service", service["command"], _compose_env(service), monkeypatch)
    assert (inference.host, inference.port) == ("0.0.0.0", GRPC_PORT["inference_service"])
    assert inference.metrics_port == METRICS_PORT["inference_service"]
    assert inference.model_store == f"model-store:{store.port}"
    assert inference.store_access == "shared"
    assert inference.shared_store_dir == store.data_dir
    assert f"{store.data_dir}:ro" in [m.split(":", 1)[1] for m in service["volumes"]]
    assert str(inference.cache_dir) in [m.split(":")[1] for m in service["volumes"]]
    _assert_budget_fits(inference.memory_budget, _docker_bytes(service["mem_limit"]))


# --- TLS and tokens ---------------------------------------------------------------

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
            assert "--insecure" not in _container(obj)["args"], obj["metadata"]["name"]


def test_compose_secrets_are_the_dev_secrets(compose: dict[str, Any], dev_secrets: Path) -> None:
    declared = compose["secrets"]
    for name, secret in declared.items():
        # /run/secrets/<name> is the file of the same name that make_dev_secrets.sh writes.
        assert secret["file"] == f"./deploy/secrets/{name}", name
        assert (dev_secrets / name).is_file(), f"make_dev_secrets.sh does not make {name}"
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
        config = _load_service_config(job, service["command"], _compose_env(service), monkeypatch)
        configs[job] = config
        assert config.insecure is False
        assert (str(config.tls_cert), str(config.tls_key)) == ("/run/secrets/server.pem", "/run/secrets/server.key")
        assert str(config.tls_client_ca) == "/run/secrets/ca.pem", "mutual TLS"
        assert str(config.auth_tokens) == "/run/secrets/tokens.yaml"
        flags = _flags(service["healthcheck"]["test"])
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
    gateway = _load_service_config(GATEWAY_JOB, service["command"], _compose_env(service), monkeypatch)
    for backend in ("store", "inference"):
        assert str(getattr(gateway, f"{backend}_tls_ca")) == "/run/secrets/ca.pem"
        assert str(getattr(gateway, f"{backend}_tls_cert")) == "/run/secrets/gateway.pem"
        assert str(getattr(gateway, f"{backend}_tls_key")) == "/run/secrets/gateway.key"


def test_prometheus_scrapes_the_services_over_mutual_tls(prometheus_config: dict[str, Any]) -> None:
    jobs = _scrape_jobs(prometheus_config)
    for job in (*JOBS, GATEWAY_JOB):
        assert jobs[job]["scheme"] == "https", job
        tls = jobs[job]["tls_config"]
        assert (tls["ca_file"], tls["cert_file"], tls["key_file"]) == (
            "/run/secrets/ca.pem",
            "/run/secrets/prometheus.pem",
            "/run/secrets/prometheus.key",
        )
    k8s = _scrape_jobs(yaml.safe_load((PROMETHEUS_DIR / "prometheus-k8s.yml").read_text()))
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
        container = _container(obj)
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
    kubectl = _kubectl()
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
        assert secrets[name]["metadata"]["namespace"] == _kustomization()["namespace"]
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


def test_k8s_services_load_their_config(k8s_objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    store_container = _container(_workload(k8s_objects, "model_service"))
    store_env = _k8s_env(store_container, k8s_objects)
    store = _load_service_config("model_service", store_container["args"], store_env, monkeypatch)
    assert (store.host, store.port, store.metrics_port) == (
        "0.0.0.0",
        GRPC_PORT["model_service"],
        METRICS_PORT["model_service"],
    )
    assert str(store.data_dir) in [m["mountPath"] for m in store_container["volumeMounts"]]

    container = _container(_workload(k8s_objects, "inference_service"))
    inference = _load_service_config(
        "inference_service", container["args"], _k8s_env(container, k8s_objects), monkeypatch
    )
    assert (inference.host, inference.port) == ("0.0.0.0", GRPC_PORT["inference_service"])
    assert inference.metrics_port == METRICS_PORT["inference_service"]
    store_service = next(o for o in k8s_objects if o["kind"] == "Service" and o["metadata"]["name"] == "model-store")
    assert inference.model_store == f"{store_service['metadata']['name']}:{store.port}"
    # The base has no shared volume (ReadWriteOnce): files come over gRPC.
    assert inference.store_access == "fetch"
    assert inference.shared_store_dir is None
    assert str(inference.cache_dir) in [m["mountPath"] for m in container["volumeMounts"]]
    _assert_budget_fits(inference.memory_budget, _k8s_bytes(container["resources"]["limits"]["memory"]))


# --- promtool -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (apt-get install prometheus); only the promtool checks are skipped")
    return path


def _run(argv: list[str], cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-k8s.yml"])
def test_promtool_check_config(promtool: str, config: str, dev_secrets: Path, tmp_path: Path) -> None:
    # promtool opens every TLS file: the container paths point at the dev secrets here
    # (so each one must be a file scripts/make_dev_secrets.sh makes), the rest is as deployed.
    text = (PROMETHEUS_DIR / config).read_text()
    paths = set(re.findall(r"(?:ca_file|cert_file|key_file): (\S+)", text))
    assert paths, "the voxserve jobs scrape over TLS"
    for path in paths:
        assert (dev_secrets / Path(path).name).is_file(), f"{path} is not made by make_dev_secrets.sh"
        text = text.replace(path, str(dev_secrets / Path(path).name))
    (tmp_path / config).write_text(text)
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    result = _run([promtool, "check", "config", config], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules(promtool: str) -> None:
    result = _run([promtool, "check", "rules", "alerts.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests(promtool: str) -> None:
    result = _run([promtool, "test", "rules", "alerts.test.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_dashboard_queries(
    promtool: str, dashboards: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    # Grafana's variables replaced by what Grafana would send, then every query checked
    # as a recording rule: promtool parses the PromQL.
    substitutions = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$instance": ".*"}
    rules = []
    for name, board in dashboards.items():
        for i, (panel, target) in enumerate(_targets(board)):
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{name} / {panel['title']}: unknown variable in {expr}"
            rules.append({"record": f"dashboard:{Path(name).stem.replace('-', '_')}:query{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# --- the HTTP gateway -----------------------------------------------------------------


def test_compose_runs_the_gateway_against_both_services(
    compose: dict[str, Any], pyproject: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    service = compose["services"][GATEWAY_COMPOSE_SERVICE]
    command = [str(c) for c in service["command"]]
    assert command[0] == "voxserve-http" and command[0] in pyproject["project"]["scripts"]
    assert service["image"] == compose["services"]["model-store"]["image"], "one image for every service"
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    config = _load_service_config(GATEWAY_JOB, command, _compose_env(service), monkeypatch)
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", GATEWAY_HTTP_PORT, GATEWAY_METRICS_PORT)
    assert config.inference == f"{COMPOSE_SERVICE['inference_service']}:{GRPC_PORT['inference_service']}"
    assert config.model_store == f"{COMPOSE_SERVICE['model_service']}:{GRPC_PORT['model_service']}"
    published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
    assert str(GATEWAY_HTTP_PORT) in published
    for backend in ("model_service", "inference_service"):
        assert service["depends_on"][COMPOSE_SERVICE[backend]]["condition"] == "service_healthy"
    health = " ".join(service["healthcheck"]["test"])
    # HTTPS (the gateway serves --tls-cert), trusting the dev CA.
    assert config.tls_cert is not None and config.tls_key is not None
    assert f"https://127.0.0.1:{GATEWAY_HTTP_PORT}/healthz" in health
    assert "cafile='/run/secrets/ca.pem'" in health
    grace = re.fullmatch(r"(\d+)s", str(service["stop_grace_period"]))
    assert grace and int(grace.group(1)) > config.grace_seconds


def test_prometheus_scrapes_the_gateway(prometheus_config: dict[str, Any], k8s_objects: list[dict[str, Any]]) -> None:
    job = _scrape_jobs(prometheus_config)[GATEWAY_JOB]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"{GATEWAY_COMPOSE_SERVICE}:{GATEWAY_METRICS_PORT}"]
    k8s = _scrape_jobs(yaml.safe_load((PROMETHEUS_DIR / "prometheus-k8s.yml").read_text()))[GATEWAY_JOB]
    (sd,) = k8s["dns_sd_configs"]
    assert sd["port"] == GATEWAY_METRICS_PORT
    (name,) = sd["names"]
    service_name, namespace = name.split(".")[:2]
    assert namespace == _kustomization()["namespace"]
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
    container = _container(workload)
    assert "command" not in container, "args keep the image's tini entrypoint"
    config = _load_service_config(GATEWAY_JOB, container["args"], _k8s_env(container, k8s_objects), monkeypatch)
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
    (selector,) = _up_selectors(rule["expr"])
    op, value = selector.value("job") or ("", "")
    assert op == "=~" and GATEWAY_JOB in value.split("|")
