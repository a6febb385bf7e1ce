"""Prometheus: scrape jobs for compose and Kubernetes, alert rules that query exported series
and name real codes and states, each alert unit-tested, and promtool accepts every file."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from model_service.state import ModelState
from tests.deploy.deploy_facts import (
    COMPOSE_SERVICE,
    JOBS,
    METRICS_PORT,
    PROMETHEUS_DIR,
    kustomization,
    scrape_jobs,
    workload_of,
)
from tests.deploy.promql import MATCHER, Series, check_expr, query_targets, selectors


def test_prometheus_scrapes_both_services(prometheus_config: dict[str, Any], compose: dict[str, Any]) -> None:
    jobs = scrape_jobs(prometheus_config)
    for job in JOBS:
        if "dns_sd_configs" in jobs[job]:  # the inference replicas: every address of the name
            (sd,) = jobs[job]["dns_sd_configs"]
            targets = [f"{name}:{sd['port']}" for name in sd["names"]]
            assert sd["type"] == "A"
        else:
            targets = [t for sc in jobs[job]["static_configs"] for t in sc["targets"]]
        assert targets == [f"{COMPOSE_SERVICE[job]}:{METRICS_PORT[job]}"]
        assert COMPOSE_SERVICE[job] in compose["services"]
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
    for rule_file in prometheus_config["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file()


def test_prometheus_k8s_discovers_pods_through_headless_services(k8s_objects: list[dict[str, Any]]) -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus-k8s.yml").read_text())
    jobs = scrape_jobs(config)
    namespace = kustomization()["namespace"]
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
        assert service["spec"]["selector"] == workload_of(k8s_objects, job)["spec"]["selector"]["matchLabels"]


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
    scraped = set(scrape_jobs(prometheus_config))
    for rule in alert_rules:
        for name, op, value in MATCHER.findall(rule["expr"]):
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
    for name, _, value in MATCHER.findall(expr):
        if name == "code":
            yield from value.split("|")


def _all_exprs(alert_rules: list[dict[str, Any]], dashboards: dict[str, dict[str, Any]]) -> list[str]:
    return [rule["expr"] for rule in alert_rules] + [
        target["expr"] for board in dashboards.values() for _, target in query_targets(board)
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
        for i, (panel, target) in enumerate(query_targets(board)):
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
