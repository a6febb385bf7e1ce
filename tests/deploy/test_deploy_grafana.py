"""Grafana: the dashboards are generated from their script, well formed, query only the
series of their service and show every one of them; the data source matches Prometheus."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_facts import DASHBOARD_DIR, DASHBOARD_JOB, GRAFANA_DIR
from tests.deploy.promql import Series, check_expr, query_targets, selectors, up_selectors


def test_grafana_rate_interval_matches_scrape_interval(prometheus_config: dict[str, Any]) -> None:
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["jsonData"]["timeInterval"] == prometheus_config["global"]["scrape_interval"]
    assert source["url"] == "http://prometheus:9090"
    assert source["type"] == "prometheus"


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
    for panel, target in query_targets(dashboards[name]):
        expr = target["expr"]
        problems += [f"{panel['title']}: {p}" for p in check_expr(expr, exported[job])]
        for sel in [*selectors(expr), *up_selectors(expr)]:
            if sel.value("job") != ("=", job) or sel.value("instance") != ("=~", "$instance"):
                problems.append(f'{panel["title"]}: {sel.metric} must select job="{job}", instance=~"$instance"')
    assert not problems


@pytest.mark.parametrize("name", sorted(DASHBOARD_JOB))
def test_dashboard_shows_every_metric_of_its_service(
    name: str, dashboards: dict[str, dict[str, Any]], exported: dict[str, dict[str, Series]]
) -> None:
    shown = {
        exported[DASHBOARD_JOB[name]][sel.metric].family
        for _, target in query_targets(dashboards[name])
        for sel in selectors(target["expr"])
        if sel.metric in exported[DASHBOARD_JOB[name]]
    }
    families = {s.family for s in exported[DASHBOARD_JOB[name]].values()}
    assert families - shown == set()
