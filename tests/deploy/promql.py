"""What the services export (series names with their labels) and a small PromQL reader, so
alert rules and dashboards can be checked against the real metrics."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from inference_service.metrics import InferenceMetrics
from model_service.metrics import ModelStoreMetrics
from tests.deploy.deploy_facts import SCRAPE_LABELS


@dataclass(frozen=True)
class Series:
    """One exposed series name (``voxserve_x_total``) and the labels it can carry."""

    family: str
    labels: frozenset[str]


def metric_wrappers(obj: object) -> Iterator[MetricWrapperBase]:
    for value in vars(obj).values():
        if isinstance(value, MetricWrapperBase):
            yield value
        elif hasattr(value, "__dict__") and not isinstance(value, CollectorRegistry):
            yield from metric_wrappers(value)


def exported_series(metrics: ModelStoreMetrics | InferenceMetrics) -> dict[str, Series]:
    """Series names as Prometheus stores them, from the registry's metric families.

    Labelled metrics without samples render nothing, so names come from the families
    (``registry.collect()``) plus the suffixes the text format adds per type.
    """
    # Label names are not part of a family without samples; read them off the metric
    # objects, and check below that those are exactly the registry's families.
    labels_by_family = {w._name: frozenset(w._labelnames) for w in metric_wrappers(metrics)}
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


_SELECTOR = re.compile(r"\b(voxserve_[A-Za-z0-9_]*)\b(\{[^}]*\})?")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
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
    return [Selector(m.group(1), tuple(MATCHER.findall(m.group(2) or ""))) for m in _SELECTOR.finditer(expr)]


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


def query_targets(board: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) of every Prometheus query (Loki log panels are checked elsewhere)."""
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            if inner.get("type") == "logs":
                continue
            for target in inner.get("targets", []):
                yield inner, target


def up_selectors(expr: str) -> list[Selector]:
    return [Selector("up", tuple(MATCHER.findall(m))) for m in re.findall(r"\bup(\{[^}]*\})", expr)]
