"""docs/metrics.md lists exactly the metrics each service registers, with their labels, and
names every dashboard panel and alert rule that uses each of them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from inference_service.metrics import InferenceMetrics
from model_service.metrics import ModelStoreMetrics
from voxserve_common.metrics import runtime_metrics
from voxserve_http.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "metrics.md"
SECTIONS = {
    "Both services": "both",
    "Model store": "store",
    "Inference service": "inference",
    "HTTP gateway": "gateway",
}


def documented() -> dict[str, dict[str, tuple[str, tuple[str, ...], str]]]:
    """section -> metric -> (type, labels, the whole row)."""
    tables: dict[str, dict[str, tuple[str, tuple[str, ...], str]]] = {v: {} for v in SECTIONS.values()}
    section = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = SECTIONS.get(line[3:].strip())
        match = re.match(r"\| `([a-z_]+)` \| (\w+) \|([^|]*)\|", line)
        if match and section is not None:
            labels = tuple(sorted(x.strip() for x in match.group(3).split(",") if x.strip()))
            tables[section][match.group(1)] = (match.group(2), labels, line)
    return tables


def registered(registry: CollectorRegistry) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exposed family name -> (type, sorted labels) of everything on a registry."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for collector in registry._collector_to_names:
        if isinstance(collector, MetricWrapperBase):
            kind = collector._type
            name = collector._name + ("_total" if kind == "counter" else "")
            found[name] = (kind, tuple(sorted(collector._labelnames)))
            continue
        for family in collector.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            labels = tuple(sorted({k for s in family.samples for k in s.labels if k != "le"}))
            found[name] = (family.type, labels)
    return found


def service_registries() -> dict[str, CollectorRegistry]:
    store, inference = ModelStoreMetrics(), InferenceMetrics()
    for metrics in (store, inference):
        runtime_metrics(metrics.registry, {"data": ROOT})  # a directory, so the dir label shows
    return {"store": store.registry, "inference": inference.registry}


def test_every_registered_metric_is_documented_and_nothing_else() -> None:
    docs = documented()
    for service, registry in service_registries().items():
        listed = {**docs["both"], **docs[service]}
        actual = registered(registry)
        cuda_only = {name for name, (_, _, row) in listed.items() if "CUDA only" in row}
        assert set(actual) - set(listed) == set(), f"{service}: registered but not in docs/metrics.md"
        assert set(listed) - set(actual) - cuda_only == set(), f"{service}: documented but not registered"
        for name, (kind, labels) in actual.items():
            assert (listed[name][0], listed[name][1]) == (kind, labels), f"{name}: type or labels differ from the doc"


def test_the_gateway_registry_is_its_section_plus_the_runtime_metrics() -> None:
    docs = documented()
    gateway = GatewayMetrics()
    runtime_metrics(gateway.registry, {"data": ROOT})
    actual = registered(gateway.registry)
    runtime_only = CollectorRegistry()
    runtime_metrics(runtime_only, {"data": ROOT})
    shared = registered(runtime_only)
    own = {name: value for name, value in actual.items() if name not in shared}
    assert set(own) == set(docs["gateway"]), "the gateway's own metrics and its docs/metrics.md section differ"
    for name, (kind, labels) in own.items():
        assert docs["gateway"][name][:2] == (kind, labels), f"{name}: type or labels differ from the doc"
    for name, (kind, labels) in shared.items():
        assert name in docs["both"], f"{name} (on the gateway too) is not under Both services"
        assert docs["both"][name][:2] == (kind, labels), f"{name}: type or labels differ from the doc"


def _uses() -> dict[str, set[str]]:
    """metric -> panel titles and alert names that query it."""
    uses: dict[str, set[str]] = {}

    def note(expr: str, user: str) -> None:
        for metric in re.findall(r"(?:voxserve|process)_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            uses.setdefault(base, set()).add(user)

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                note(target.get("expr", ""), f'"{panel["title"]}"')

    for dashboard in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"):
        walk(json.loads(dashboard.read_text()).get("panels", []))
    for group in yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            note(rule["expr"], rule["alert"])
    return uses


def test_rows_name_the_panels_and_alerts_that_use_each_metric() -> None:
    rows = {name: row for table in documented().values() for name, (_, _, row) in table.items()}
    uses = _uses()
    assert uses, "no dashboard or alert queries were found"
    for metric, users in uses.items():
        assert metric in rows, f"{metric} is queried by {sorted(users)} but not documented"
        used_by = rows[metric].rsplit("|", 2)[1]
        missing = sorted(user for user in users if user not in used_by)
        assert not missing, f"{metric}: docs/metrics.md does not name {missing}"
