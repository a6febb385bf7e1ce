"""Generate the Grafana dashboards in deploy/grafana/dashboards/ from panel lists.

    python deploy/grafana/generate_dashboards.py          # rewrite the JSON files
    python deploy/grafana/generate_dashboards.py --check  # exit 1 if they are stale

The JSON files are committed (Grafana provisions them as they are); edit this script,
not the JSON. tests/deploy/test_deploy_grafana.py proves the two are in sync and that
every metric queried here exists in the services' registries.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
SCHEMA_VERSION = 39
GRID_WIDTH = 24
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The compose stack's Loki and Tempo data sources (deploy/grafana/provisioning/datasources).
LOKI = {"type": "loki", "uid": "loki"}
TEMPO = {"type": "tempo", "uid": "tempo"}
# promtail's stream selector for every voxserve log line (deploy/promtail/promtail.yaml).
LOG_STREAM = '{job="voxserve"}'
SERVER_ERROR_CODES = "UNKNOWN|INTERNAL|UNAVAILABLE|DATA_LOSS|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|UNIMPLEMENTED"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Link:
    """A panel link (Grafana interpolates the dashboard's variables in ``url``)."""

    title: str
    url: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: Sequence[Query]
    kind: str = "timeseries"
    unit: str = "short"
    description: str = ""
    width: int = 12
    height: int = 8
    stacked: bool = False
    min: float | None = None
    max: float | None = None
    # (value, colour) steps; the first value is None (the base colour).
    thresholds: Sequence[tuple[float | None, str]] = ((None, "green"),)
    threshold_line: bool = False
    dashed: str | None = None  # regex of series names drawn dashed (e.g. budgets)
    links: Sequence[Link] = ()


@dataclass(frozen=True)
class Row:
    title: str
    panels: Sequence[Panel]


@dataclass(frozen=True)
class Scope:
    """Builds selectors that every panel shares: one job, the $instance variable."""

    job: str

    def sel(self, metric: str, matchers: str = "") -> str:
        extra = f", {matchers}" if matchers else ""
        return f'{metric}{{job="{self.job}", instance=~"$instance"{extra}}}'

    def rate(self, metric: str, matchers: str = "") -> str:
        return f"rate({self.sel(metric, matchers)}[$__rate_interval])"

    def quantile(self, q: float, histogram: str, by: str = "") -> str:
        group = f"{by}, le" if by else "le"
        return f"histogram_quantile({q}, sum by ({group}) ({self.rate(histogram + '_bucket')}))"


@dataclass
class _Ids:
    next_id: int = 1
    used: list[int] = field(default_factory=list)

    def take(self) -> int:
        value = self.next_id
        self.next_id += 1
        self.used.append(value)
        return value


def _target(query: Query, ref: str, kind: str = "timeseries") -> dict[str, Any]:
    if kind == "logs":
        return {"datasource": LOKI, "editorMode": "code", "expr": query.expr, "queryType": "range", "refId": ref}
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": query.expr,
        "instant": query.instant,
        "legendFormat": query.legend or "__auto",
        "range": not query.instant,
        "refId": ref,
    }


def _field_config(panel: Panel) -> dict[str, Any]:
    if panel.kind == "logs":
        return {"defaults": {}, "overrides": []}
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "color": {"mode": "palette-classic" if panel.kind == "timeseries" else "thresholds"},
        "thresholds": {
            "mode": "absolute",
            "steps": [{"color": colour, "value": value} for value, colour in panel.thresholds],
        },
        "mappings": [],
    }
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    overrides: list[dict[str, Any]] = []
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineInterpolation": "linear",
            "lineWidth": 1,
            "fillOpacity": 30 if panel.stacked else 10,
            "gradientMode": "none",
            "showPoints": "never",
            "spanNulls": False,
            "axisPlacement": "auto",
            "axisSoftMin": 0,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
            "thresholdsStyle": {"mode": "line" if panel.threshold_line else "off"},
        }
        if panel.dashed:
            overrides.append(
                {
                    "matcher": {"id": "byRegexp", "options": panel.dashed},
                    "properties": [
                        {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                        {"id": "custom.fillOpacity", "value": 0},
                    ],
                }
            )
    return {"defaults": defaults, "overrides": overrides}


def _options(panel: Panel) -> dict[str, Any]:
    reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if panel.kind == "timeseries":
        return {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if panel.kind == "stat":
        return {
            "reduceOptions": reduce,
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
            "showPercentChange": False,
            "wideLayout": True,
        }
    if panel.kind == "gauge":
        return {
            "reduceOptions": reduce,
            "orientation": "auto",
            "showThresholdLabels": False,
            "showThresholdMarkers": True,
            "sizing": "auto",
        }
    if panel.kind == "logs":
        return {
            "showTime": True,
            "showLabels": False,
            "showCommonLabels": False,
            "wrapLogMessage": True,
            "prettifyLogMessage": False,
            "enableLogDetails": True,
            "dedupStrategy": "none",
            "sortOrder": "Descending",
        }
    if panel.kind == "bargauge":
        return {
            "reduceOptions": reduce,
            "displayMode": "gradient",
            "orientation": "horizontal",
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "auto",
            "sizing": "auto",
            "minVizHeight": 16,
            "minVizWidth": 8,
            "maxVizHeight": 300,
        }
    raise ValueError(f"unknown panel kind {panel.kind!r}")


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    refs = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": LOKI if panel.kind == "logs" else DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": _field_config(panel),
        "options": _options(panel),
        "targets": [_target(q, refs[i], panel.kind) for i, q in enumerate(panel.queries)],
    }
    if panel.links:
        out["links"] = [{"title": link.title, "url": link.url, "targetBlank": True} for link in panel.links]
    return out


def explore_url(datasource: dict[str, str], query: dict[str, str]) -> str:
    """A Grafana Explore link running ``query`` on ``datasource`` over the dashboard's time
    range. ``$name`` variables in the query stay for Grafana to fill in (percent-encoded)."""
    placeholders = {"__from": "${__from}", "__to": "${__to}"}
    text = json.dumps(query)
    for name in ("job_id", "trace_id"):
        if f"${name}" in text:
            text = text.replace(f"${name}", f"@@{name}@@")
            placeholders[name] = f"${{{name}:percentencode}}"
    panes = {
        "a": {
            "datasource": datasource["uid"],
            "queries": [{"refId": "A", "datasource": datasource, **json.loads(text)}],
            "range": {"from": "@@__from@@", "to": "@@__to@@"},
        }
    }
    url = "/explore?schemaVersion=1&panes=" + urllib.parse.quote(json.dumps(panes, separators=(",", ":")), safe="")
    for name, value in placeholders.items():
        url = url.replace(f"%40%40{name}%40%40", value)
    return url


JOB_LOGS = f'{LOG_STREAM} | job_id="$job_id"'
JOB_LINKS = (
    Link("Logs of job ${job_id} (Loki)", explore_url(LOKI, {"expr": JOB_LOGS, "queryType": "range"})),
    Link("Trace ${trace_id} (Tempo)", explore_url(TEMPO, {"query": "$trace_id", "queryType": "traceql"})),
)


def _layout(rows: Sequence[Row], ids: _Ids) -> list[dict[str, Any]]:
    """Rows top to bottom; panels left to right, wrapping at the grid width."""
    out: list[dict[str, Any]] = []
    y = 0
    for row in rows:
        out.append(
            {
                "id": ids.take(),
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if panel.width > GRID_WIDTH:
                raise ValueError(f"panel {panel.title!r} is wider than the grid")
            if x + panel.width > GRID_WIDTH:
                y += line_height
                x, line_height = 0, 0
            out.append(_panel_json(panel, ids.take(), x, y))
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return out


def _textbox(name: str, label: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "textbox",
        "query": "",
        "current": {"selected": False, "text": "", "value": ""},
        "hide": 0,
        "options": [],
        "skipUrlSync": False,
    }


def _templating(job: str) -> dict[str, Any]:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
                "hide": 0,
                "includeAll": False,
                "multi": False,
                "options": [],
                "refresh": 1,
                "regex": "",
                "skipUrlSync": False,
            },
            {
                "name": "instance",
                "label": "Instance",
                "type": "query",
                "datasource": DATASOURCE,
                "definition": f'label_values(up{{job="{job}"}}, instance)',
                "query": {
                    "qryType": 1,
                    "query": f'label_values(up{{job="{job}"}}, instance)',
                    "refId": "PrometheusVariableQueryEditor-VariableQuery",
                },
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "hide": 0,
                "includeAll": True,
                "allValue": ".*",
                "multi": True,
                "options": [],
                "refresh": 2,
                "regex": "",
                "skipUrlSync": False,
                "sort": 1,
            },
            # For the links to a job's logs and trace (Loki, Tempo) and the log panels.
            _textbox("job_id", "Job id"),
            _textbox("trace_id", "Trace id"),
        ]
    }


def dashboard(*, uid: str, title: str, description: str, job: str, rows: Sequence[Row]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["voxserve"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "weekStart": "",
        "id": None,
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "title": "voxserve dashboards",
                "type": "dashboards",
                "tags": ["voxserve"],
                "asDropdown": False,
                "includeVars": False,
                "keepTime": True,
                "targetBlank": False,
                "icon": "external link",
                "tooltip": "",
                "url": "",
            }
        ],
        "templating": _templating(job),
        "panels": _layout(rows, _Ids()),
    }


def rpc_row(s: Scope) -> Row:
    requests = "voxserve_rpc_requests_total"
    not_ok = 'code!="OK"'
    server_error = f'code=~"{SERVER_ERROR_CODES}"'
    started = f"sum by (method) ({s.sel('voxserve_rpc_started_total')})"
    finished = f"sum by (method) ({s.sel(requests)})"
    return Row(
        "RPC",
        [
            Panel(
                "Requests by method",
                [Query(f"sum by (method) ({s.rate(requests)})", "{{method}}")],
                unit="reqps",
                width=8,
            ),
            Panel(
                "Errors by method and code",
                [Query(f"sum by (method, code) ({s.rate(requests, not_ok)})", "{{method}} {{code}}")],
                unit="reqps",
                width=8,
                description="Every non-OK status, caller errors (NOT_FOUND, INVALID_ARGUMENT, CANCELLED) included.",
            ),
            Panel(
                "Server error ratio",
                [
                    Query(
                        f"sum({s.rate(requests, server_error)}) / sum({s.rate(requests)})",
                        "server errors",
                    )
                ],
                unit="percentunit",
                width=8,
                min=0,
                thresholds=((None, "green"), (0.05, "red")),
                threshold_line=True,
                description="Share of RPCs ending with a server-side code; the alert fires above 5%.",
            ),
            Panel(
                "Latency p50 / p99 by method",
                [
                    Query(s.quantile(0.5, "voxserve_rpc_duration_seconds", "method"), "p50 {{method}}"),
                    Query(s.quantile(0.99, "voxserve_rpc_duration_seconds", "method"), "p99 {{method}}"),
                ],
                unit="s",
                width=16,
                description="Streaming RPCs are timed until their final status, so long streams dominate p99.",
            ),
            Panel(
                "In-flight RPCs",
                [
                    Query(
                        f"{started} - ({finished} or 0 * {started})",
                        "{{method}}",
                    )
                ],
                width=8,
                description="Started minus finished, per method (open streams included).",
            ),
        ],
    )


def model_store() -> dict[str, Any]:
    s = Scope("model_service")
    ready = 'state="READY"'
    return dashboard(
        uid="voxserve-model-store",
        title="voxserve / Model store",
        description="Downloads, catalog, disk and RPCs of the voxserve model store.",
        job=s.job,
        rows=[
            Row(
                "Overview",
                [
                    Panel(
                        "Up",
                        [Query(f"min({s.sel('up')})", "up")],
                        kind="stat",
                        width=4,
                        height=4,
                        thresholds=((None, "red"), (1, "green")),
                    ),
                    Panel(
                        "Models ready",
                        [Query(f"sum({s.sel('voxserve_models', ready)})", "ready")],
                        kind="stat",
                        width=4,
                        height=4,
                    ),
                    Panel(
                        "Download queue",
                        [Query(f"sum({s.sel('voxserve_download_queue_length')})", "queued")],
                        kind="stat",
                        width=4,
                        height=4,
                        thresholds=((None, "green"), (5, "orange")),
                    ),
                    Panel(
                        "Disk free",
                        [Query(f"min({s.sel('voxserve_disk_free_bytes')})", "free")],
                        kind="stat",
                        unit="bytes",
                        width=4,
                        height=4,
                        thresholds=((None, "red"), (5 * 1024**3, "orange"), (20 * 1024**3, "green")),
                    ),
                    Panel(
                        "Verification failures",
                        [Query(f"sum({s.sel('voxserve_verification_failures_total')}) or vector(0)", "failures")],
                        kind="stat",
                        width=4,
                        height=4,
                        thresholds=((None, "green"), (1, "red")),
                        description="Files that failed size or sha256 verification since the store started.",
                    ),
                    Panel(
                        "Open watch streams",
                        [Query(f"sum({s.sel('voxserve_active_watchers')})", "streams")],
                        kind="stat",
                        width=4,
                        height=4,
                    ),
                ],
            ),
            Row(
                "Downloads",
                [
                    Panel(
                        "Downloads by outcome and source",
                        [
                            Query(
                                f"sum by (source) ({s.rate('voxserve_downloads_started_total')})", "started {{source}}"
                            ),
                            Query(
                                f"sum by (source) ({s.rate('voxserve_downloads_completed_total')})",
                                "completed {{source}}",
                            ),
                            Query(
                                f"sum by (source) ({s.rate('voxserve_downloads_failed_total')})", "failed {{source}}"
                            ),
                        ],
                        unit="ops",
                    ),
                    Panel(
                        "Download failures by source and reason",
                        [
                            Query(
                                f"sum by (source, reason) ({s.rate('voxserve_downloads_failed_total')})",
                                "{{source}} {{reason}}",
                            )
                        ],
                        unit="ops",
                    ),
                    Panel(
                        "Throughput by source",
                        [Query(f"sum by (source) ({s.rate('voxserve_download_bytes_total')})", "{{source}}")],
                        unit="Bps",
                        width=8,
                    ),
                    Panel(
                        "Current speed by model",
                        [
                            Query(
                                f"sum by (model_id) ({s.sel('voxserve_download_speed_bytes_per_second')})",
                                "{{model_id}}",
                            )
                        ],
                        unit="Bps",
                        width=8,
                        description="As measured by the downloader; 0 when the model is not downloading.",
                    ),
                    Panel(
                        "Download queue length",
                        [Query(f"sum by (instance) ({s.sel('voxserve_download_queue_length')})", "{{instance}}")],
                        width=8,
                        thresholds=((None, "green"), (5, "orange")),
                        threshold_line=True,
                    ),
                    Panel(
                        "Download duration p50 / p95",
                        [
                            Query(s.quantile(0.5, "voxserve_download_duration_seconds"), "p50"),
                            Query(s.quantile(0.95, "voxserve_download_duration_seconds"), "p95"),
                        ],
                        unit="s",
                        width=24,
                        description="Wall time of completed downloads, queue wait excluded.",
                    ),
                ],
            ),
            Row(
                "Catalog and disk",
                [
                    Panel(
                        "Models by state",
                        [Query(f"sum by (state) ({s.sel('voxserve_models')})", "{{state}}")],
                        stacked=True,
                    ),
                    Panel(
                        "Disk per model",
                        [
                            Query(
                                f"sort_desc(sum by (model_id) ({s.sel('voxserve_model_disk_bytes')}))",
                                "{{model_id}}",
                                instant=True,
                            )
                        ],
                        kind="bargauge",
                        unit="bytes",
                    ),
                    Panel(
                        "Disk: free and used by models",
                        [
                            Query(f"sum by (instance) ({s.sel('voxserve_disk_free_bytes')})", "free {{instance}}"),
                            Query(f"sum by (instance) ({s.sel('voxserve_model_disk_bytes')})", "models {{instance}}"),
                        ],
                        unit="bytes",
                        width=8,
                    ),
                    Panel(
                        "Verification failures by model",
                        [
                            Query(
                                f"sum by (model_id) ({s.sel('voxserve_verification_failures_total')})",
                                "{{model_id}}",
                            )
                        ],
                        width=8,
                        description="Cumulative since the store started; any value above 0 needs a look.",
                        thresholds=((None, "green"), (1, "red")),
                    ),
                    Panel(
                        "Open watch streams by RPC",
                        [Query(f"sum by (rpc) ({s.sel('voxserve_active_watchers')})", "{{rpc}}")],
                        width=8,
                        description="Open WatchModels and PullModel streams.",
                    ),
                ],
            ),
            Row(
                "Hub sources",
                [
                    Panel(
                        "Sources up (breaker closed)",
                        [Query(f"min by (source) ({s.sel('voxserve_source_up')})", "{{source}}")],
                        width=12,
                        min=0,
                        thresholds=((None, "red"), (1, "green")),
                        description="1 while a hub endpoint's circuit breaker lets requests through; 0 while it is open.",
                    ),
                    Panel(
                        "Source failures by reason",
                        [
                            Query(
                                f"sum by (source, reason) ({s.rate('voxserve_source_failures_total')})",
                                "{{source}} {{reason}}",
                            )
                        ],
                        unit="reqps",
                        width=12,
                        description="Failed requests to each hub endpoint; ListSources / voxctl models sources has the last reason.",
                    ),
                ],
            ),
            logs_row("model_service"),
            rpc_row(s),
        ],
    )


def inference() -> dict[str, Any]:
    s = Scope("inference_service")
    hits = f"sum({s.rate('voxserve_cache_hits_total')})"
    misses = f"sum({s.rate('voxserve_cache_misses_total')})"
    return dashboard(
        uid="voxserve-inference",
        title="voxserve / Inference",
        description="Model cache, memory, transcription jobs, speed and RPCs of voxserve inference nodes.",
        job=s.job,
        rows=[
            Row(
                "Overview",
                [
                    Panel(
                        "Up",
                        [Query(f"min({s.sel('up')})", "up")],
                        kind="stat",
                        width=4,
                        height=4,
                        thresholds=((None, "red"), (1, "green")),
                    ),
                    Panel(
                        "Loaded models",
                        [Query(f"sum({s.sel('voxserve_loaded_models')})", "loaded")],
                        kind="stat",
                        width=4,
                        height=4,
                    ),
                    Panel(
                        "Cache memory / budget",
                        [
                            Query(
                                f"sum({s.sel('voxserve_memory_used_bytes')})"
                                f" / sum({s.sel('voxserve_memory_budget_bytes')})",
                                "used",
                            )
                        ],
                        kind="gauge",
                        unit="percentunit",
                        width=4,
                        height=4,
                        min=0,
                        max=1,
                        thresholds=((None, "green"), (0.8, "orange"), (0.9, "red")),
                    ),
                    Panel(
                        "Cache hit ratio",
                        [Query(f"{hits} / ({hits} + {misses})", "hit ratio")],
                        kind="stat",
                        unit="percentunit",
                        width=4,
                        height=4,
                        thresholds=((None, "orange"), (0.8, "green")),
                    ),
                    Panel(
                        "Jobs",
                        [Query(f"sum({s.sel('voxserve_jobs')})", "jobs")],
                        kind="stat",
                        width=4,
                        height=4,
                        description="Transcription jobs currently admitted, running or waiting.",
                    ),
                    Panel(
                        "Job queue",
                        [Query(f"sum({s.sel('voxserve_job_queue_length')})", "queued")],
                        kind="stat",
                        width=4,
                        height=4,
                        thresholds=((None, "green"), (5, "orange")),
                    ),
                ],
            ),
            Row(
                "Model cache",
                [
                    Panel(
                        "Cache hits and misses by model",
                        [
                            Query(f"sum by (model_id) ({s.rate('voxserve_cache_hits_total')})", "hit {{model_id}}"),
                            Query(f"sum by (model_id) ({s.rate('voxserve_cache_misses_total')})", "miss {{model_id}}"),
                        ],
                        unit="ops",
                        width=8,
                    ),
                    Panel(
                        "Evictions by reason",
                        [Query(f"sum by (reason) ({s.rate('voxserve_cache_evictions_total')})", "{{reason}}")],
                        unit="ops",
                        width=8,
                        stacked=True,
                        description="count_limit and memory_budget make room; watchdog: memory pressure; idle: unused for model_idle_ttl_seconds; unload: an admin's UnloadModel.",
                    ),
                    Panel(
                        "Model loads by result",
                        [Query(f"sum by (result) ({s.rate('voxserve_model_loads_total')})", "{{result}}")],
                        unit="ops",
                        width=8,
                        stacked=True,
                    ),
                    Panel(
                        "Load duration p50 / p95 by model",
                        [
                            Query(
                                s.quantile(0.5, "voxserve_model_load_duration_seconds", "model_id"), "p50 {{model_id}}"
                            ),
                            Query(
                                s.quantile(0.95, "voxserve_model_load_duration_seconds", "model_id"), "p95 {{model_id}}"
                            ),
                        ],
                        unit="s",
                    ),
                    Panel(
                        "Loaded models",
                        [Query(f"sum by (instance) ({s.sel('voxserve_loaded_models')})", "{{instance}}")],
                    ),
                    Panel(
                        "Memory of each loaded model",
                        [
                            Query(
                                f"sort_desc(sum by (model_id) ({s.sel('voxserve_loaded_model_bytes')}))",
                                "{{model_id}}",
                                instant=True,
                            )
                        ],
                        kind="bargauge",
                        unit="bytes",
                    ),
                    Panel(
                        "Memory used vs budget",
                        [
                            Query(
                                f"sum by (instance, device) ({s.sel('voxserve_memory_used_bytes')})",
                                "used {{instance}} {{device}}",
                            ),
                            Query(
                                f"sum by (instance, device) ({s.sel('voxserve_memory_budget_bytes')})",
                                "budget {{instance}} {{device}}",
                            ),
                        ],
                        unit="bytes",
                        dashed="^budget .*",
                    ),
                ],
            ),
            Row(
                "Jobs",
                [
                    Panel(
                        "Jobs by state",
                        [Query(f"sum by (state) ({s.sel('voxserve_jobs')})", "{{state}}")],
                        width=8,
                        stacked=True,
                    ),
                    Panel(
                        "Jobs finished by outcome",
                        [Query(f"sum by (outcome) ({s.rate('voxserve_jobs_finished_total')})", "{{outcome}}")],
                        unit="ops",
                        width=8,
                        stacked=True,
                        links=JOB_LINKS,
                        description="Panel links: the logs of the job in the Job id variable, the trace in Trace id.",
                    ),
                    Panel(
                        "Job queue length",
                        [Query(f"sum by (instance) ({s.sel('voxserve_job_queue_length')})", "{{instance}}")],
                        width=8,
                        thresholds=((None, "green"), (5, "orange")),
                        threshold_line=True,
                    ),
                    Panel(
                        "Audio seconds transcribed per second",
                        [
                            Query(
                                f"sum by (model_id) ({s.rate('voxserve_audio_seconds_processed_total')})",
                                "{{model_id}}",
                            )
                        ],
                        width=8,
                        stacked=True,
                        description="Throughput in multiples of real time: 10 means ten audio seconds per wall second.",
                    ),
                    Panel(
                        "Real-time factor p50 / p95 by model",
                        [
                            Query(s.quantile(0.5, "voxserve_real_time_factor", "model_id"), "p50 {{model_id}}"),
                            Query(s.quantile(0.95, "voxserve_real_time_factor", "model_id"), "p95 {{model_id}}"),
                        ],
                        width=8,
                        min=0,
                        thresholds=((None, "green"), (1, "red")),
                        threshold_line=True,
                        description="Processing seconds per audio second; above 1 is slower than real time.",
                    ),
                    Panel(
                        "Time to first segment p50 / p95 by model",
                        [
                            Query(
                                s.quantile(0.5, "voxserve_time_to_first_segment_seconds", "model_id"),
                                "p50 {{model_id}}",
                            ),
                            Query(
                                s.quantile(0.95, "voxserve_time_to_first_segment_seconds", "model_id"),
                                "p95 {{model_id}}",
                            ),
                        ],
                        unit="s",
                        width=8,
                        thresholds=((None, "green"), (5, "red")),
                        threshold_line=True,
                        description="From request to the first segment sent, model load included on a cache miss.",
                    ),
                    Panel(
                        "Diarization time p50 / p95 by model",
                        [
                            Query(
                                s.quantile(0.5, "voxserve_diarization_duration_seconds", "model_id"),
                                "p50 {{model_id}}",
                            ),
                            Query(
                                s.quantile(0.95, "voxserve_diarization_duration_seconds", "model_id"),
                                "p95 {{model_id}}",
                            ),
                        ],
                        unit="s",
                        width=12,
                        description="Who spoke when in one diarized job's audio (VAD, speaker embeddings, clustering).",
                    ),
                    Panel(
                        "Speakers found per diarized job p50 / p95",
                        [
                            Query(s.quantile(0.5, "voxserve_diarization_speakers", "model_id"), "p50 {{model_id}}"),
                            Query(s.quantile(0.95, "voxserve_diarization_speakers", "model_id"), "p95 {{model_id}}"),
                        ],
                        width=12,
                        min=0,
                        description="How many speakers diarization found in each job.",
                    ),
                    Panel(
                        "Ended jobs kept for WatchJob",
                        [Query(f"sum by (instance) ({s.sel('voxserve_jobs_retained')})", "{{instance}}")],
                        width=8,
                        description="Within job_retention_seconds, job_retention_max_jobs and job_retention_max_bytes.",
                    ),
                    Panel(
                        "Memory of the ended jobs kept",
                        [Query(f"sum by (instance) ({s.sel('voxserve_jobs_retained_bytes')})", "{{instance}}")],
                        unit="bytes",
                        width=8,
                        description="Their events (an ended job holds no audio); stays under job_retention_max_bytes.",
                    ),
                    Panel(
                        "Ended jobs evicted by reason",
                        [Query(f"sum by (reason) ({s.rate('voxserve_jobs_evicted_total')})", "{{reason}}")],
                        unit="ops",
                        width=8,
                        stacked=True,
                        description="expired: past job_retention_seconds; count_limit, bytes_limit: the other limits.",
                    ),
                ],
            ),
            Row(
                "Live transcription",
                [
                    Panel(
                        "Live streams",
                        [
                            Query(f"sum({s.sel('voxserve_live_streams_active')})", "active"),
                            Query(
                                f"sum by (outcome) ({s.rate('voxserve_live_streams_finished_total')})",
                                "ended {{outcome}}",
                            ),
                        ],
                        width=8,
                    ),
                    Panel(
                        "Final-result latency p50 / p90",
                        [
                            Query(s.quantile(0.5, "voxserve_live_final_result_latency_seconds"), "p50"),
                            Query(s.quantile(0.9, "voxserve_live_final_result_latency_seconds"), "p90"),
                            Query(s.quantile(0.5, "voxserve_live_time_to_first_result_seconds"), "first result p50"),
                        ],
                        unit="s",
                        width=8,
                        description="Wall time a final result was sent minus the wall time its audio end arrived.",
                    ),
                    Panel(
                        "Lag (audio received - processed)",
                        [
                            Query(f"max({s.sel('voxserve_live_max_lag_seconds')})", "max now"),
                            Query(s.quantile(0.9, "voxserve_live_lag_seconds"), "p90"),
                        ],
                        unit="s",
                        width=8,
                        thresholds=((None, "green"), (3, "red")),
                        threshold_line=True,
                        description="Above live_max_lag_seconds a stream decodes less often on larger chunks.",
                    ),
                    Panel(
                        "Decode time p50 / p95 and draft rewrites",
                        [
                            Query(s.quantile(0.5, "voxserve_live_decode_seconds"), "decode p50"),
                            Query(s.quantile(0.95, "voxserve_live_decode_seconds"), "decode p95"),
                            Query(f"sum({s.rate('voxserve_live_draft_rewrites_total')})", "draft rewrites/s"),
                            Query(f"sum({s.rate('voxserve_live_drafts_dropped_total')})", "drafts dropped/s"),
                        ],
                        width=12,
                    ),
                ],
            ),
            Row(
                "Decode batching",
                [
                    Panel(
                        "Batch size p50 / p95 by op",
                        [
                            Query(s.quantile(0.5, "voxserve_decode_batch_size", by="op"), "p50 {{op}}"),
                            Query(s.quantile(0.95, "voxserve_decode_batch_size", by="op"), "p95 {{op}}"),
                        ],
                        width=6,
                        description="Items (one job or stream each) in one batched encode or generate call; "
                        "1 means no other request shared the call.",
                    ),
                    Panel(
                        "Calls waiting for a batch",
                        [Query(f"sum by (model_id) ({s.sel('voxserve_decode_items_waiting')})", "{{model_id}}")],
                        width=6,
                        description="Encoder/decoder calls queued on each model's decode scheduler; "
                        "a steady climb means the node is saturated.",
                    ),
                    Panel(
                        "Wait for a batch p50 / p95 by lane",
                        [
                            Query(s.quantile(0.5, "voxserve_decode_wait_seconds", by="lane"), "p50 {{lane}}"),
                            Query(s.quantile(0.95, "voxserve_decode_wait_seconds", by="lane"), "p95 {{lane}}"),
                        ],
                        unit="s",
                        width=6,
                        description="The latency lane (live streams, first segments) should stay near batch_window_ms.",
                    ),
                    Panel(
                        "Batched calls per second",
                        [Query(f"sum by (op, lane) ({s.rate('voxserve_decode_items_total')})", "{{op}} {{lane}}")],
                        unit="ops",
                        width=6,
                        stacked=True,
                        description="Encoder/decoder calls run in batches, by op (encode, generate) and lane.",
                    ),
                ],
            ),
            Row(
                "Model store (as this service sees it)",
                [
                    Panel(
                        "Model store reachable",
                        [Query(f"min({s.sel('voxserve_store_reachable')})", "reachable")],
                        kind="stat",
                        width=6,
                        thresholds=((None, "red"), (1, "green")),
                        description="0 once the retries against an unreachable store gave up (and before first contact).",
                    ),
                    Panel(
                        "Store failures by reason",
                        [Query(f"sum by (reason) ({s.rate('voxserve_store_failures_total')})", "{{reason}}")],
                        unit="ops",
                        width=18,
                        stacked=True,
                        description="store_unreachable: the store is down; sources_failed: it is up, its hub sources failed.",
                    ),
                ],
            ),
            logs_row("inference_service"),
            rpc_row(s),
        ],
    )


def logs_row(service: str) -> Row:
    """Loki panels (compose: promtail ships the services' log files): a job's lines and the
    service's errors; each line's trace_id links to Tempo (the Loki data source's derived field)."""
    return Row(
        "Logs and traces",
        [
            Panel(
                "Lines of job $job_id (both services)",
                [Query(JOB_LOGS)],
                kind="logs",
                width=12,
                height=10,
                links=JOB_LINKS,
                description="Set the Job id variable; open a line for its trace (trace_id links to Tempo).",
            ),
            Panel(
                "Warnings and errors",
                [Query(f'{{job="voxserve", service="{service}", level=~"WARNING|ERROR|CRITICAL"}}')],
                kind="logs",
                width=12,
                height=10,
                links=JOB_LINKS[1:],
            ),
        ],
    )


DASHBOARDS = {"model-store.json": model_store, "inference.json": inference}


def render() -> dict[str, str]:
    """File name -> JSON text, exactly as committed."""
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = DASHBOARD_DIR / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale dashboards (run {Path(__file__).name}): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
