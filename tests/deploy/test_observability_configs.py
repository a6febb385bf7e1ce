"""The compose observability stack, checked statically (its images cannot run here: see
tests/deploy/test_compose_podman.py): the OpenTelemetry collector's pipelines are wired and
listen where the services export, Tempo, Loki and promtail agree on ports, paths and volumes
with docker-compose.yml, promtail reads the files the services write and extracts fields a
real voxserve log line has, Grafana's data sources point at the compose service names and
link traces to logs and back, and the dashboards link a job to its logs and trace."""

from __future__ import annotations

import io
import json
import logging
import re
import urllib.parse
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider

from voxserve_common.logs import ContextFilter, json_formatter, log_context

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources"
VOXSERVE_SERVICES = ("model-store", "inference", "http-gateway")
# Labels promtail may set: bounded sets only (a label per job or trace id would make one
# Loki stream per job).
BOUNDED_LABELS = {"job", "service", "level"}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = _yaml(ROOT / "docker-compose.yml")
    return data


@pytest.fixture(scope="module")
def datasources() -> dict[str, dict[str, Any]]:
    """Provisioned Grafana data sources by uid (every file of the directory)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(DATASOURCES.glob("*.yml")):
        for source in _yaml(path)["datasources"]:
            assert source["uid"] not in out, f"duplicate data source uid {source['uid']}"
            out[source["uid"]] = source
    return out


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source of each volume of a compose service."""
    out = {}
    for mount in service.get("volumes", []):
        source, target = str(mount).split(":")[:2]
        out[target] = source
    return out


def _config_file(service: dict[str, Any], flag_prefix: str) -> Path:
    """The repository file a service is started with (``-config.file=`` / ``--config=``)."""
    (arg,) = [a for a in service["command"] if a.startswith(flag_prefix)]
    in_container = arg.split("=", 1)[1]
    source = _mounts(service)[in_container]
    assert source.startswith("./deploy/"), source
    return ROOT / source


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"//{url}")
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


def _listen_port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_the_stack_is_in_compose(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("otel-collector", "tempo", "loki", "promtail", "grafana"):
        image = services[name]["image"]
        assert re.search(r":\d+\.\d+\.\d+$", image), f"{name}: pin an image version, not {image}"
    # No published port: only Grafana (and Prometheus) are for people; the rest talk on the
    # compose network.
    for name in ("otel-collector", "tempo", "loki", "promtail"):
        assert "ports" not in services[name], name


def test_services_export_traces_to_the_collector(compose: dict[str, Any]) -> None:
    collector = compose["services"]["otel-collector"]
    config = _yaml(_config_file(collector, "--config="))
    grpc_port = _listen_port(config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    for name in VOXSERVE_SERVICES:
        env = compose["services"][name]["environment"]
        assert env["OTEL_TRACES_EXPORTER"] == "${OTEL_TRACES_EXPORTER:-otlp}", name
        host, port = _host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert (host, port) == ("otel-collector", grpc_port), name


def test_collector_pipelines_are_wired(compose: dict[str, Any]) -> None:
    config = _yaml(_config_file(compose["services"]["otel-collector"], "--config="))
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces"}
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for pipeline in pipelines.values():
        for kind, names in used.items():
            assert pipeline.get(kind) or kind == "processors", kind
            for name in pipeline.get(kind, []):
                assert name in config[kind], f"pipeline uses undefined {kind[:-1]} {name}"
                names.add(name)
    for kind, names in used.items():
        assert set(config.get(kind) or {}) == names, f"defined but unused {kind}: {set(config[kind]) - names}"
    # memory_limiter first: it must see data before batching holds it.
    assert pipelines["traces"]["processors"][0] == "memory_limiter"
    assert set(config["service"]["extensions"]) == set(config["extensions"])


def test_collector_exports_to_tempo(compose: dict[str, Any]) -> None:
    collector = _yaml(_config_file(compose["services"]["otel-collector"], "--config="))
    (exporter,) = [v for k, v in collector["exporters"].items() if k.split("/")[0] == "otlp"]
    host, port = _host_port(exporter["endpoint"])
    assert host == "tempo" and host in compose["services"]
    tempo = _yaml(_config_file(compose["services"]["tempo"], "-config.file="))
    assert _listen_port(tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]) == port
    assert compose["services"]["otel-collector"]["depends_on"]["tempo"]


def test_tempo_stores_on_its_volume(compose: dict[str, Any]) -> None:
    service = compose["services"]["tempo"]
    tempo = _yaml(_config_file(service, "-config.file="))
    volumes = {target for target, source in _mounts(service).items() if not source.startswith(".")}
    storage = tempo["storage"]["trace"]
    assert storage["backend"] == "local"
    for path in (storage["wal"]["path"], storage["local"]["path"]):
        assert any(Path(path).is_relative_to(v) for v in volumes), f"{path} is not on a volume"
    assert tempo["compactor"]["compaction"]["block_retention"], "bounded disk use"


def test_loki_stores_on_its_volume_and_keeps_structured_metadata(compose: dict[str, Any]) -> None:
    service = compose["services"]["loki"]
    loki = _yaml(_config_file(service, "-config.file="))
    volumes = {target for target, source in _mounts(service).items() if not source.startswith(".")}
    assert loki["common"]["path_prefix"] in volumes
    assert loki["limits_config"]["allow_structured_metadata"] is True
    (schema,) = loki["schema_config"]["configs"]
    assert schema["schema"] == "v13" and schema["store"] == "tsdb", "structured metadata needs tsdb + v13"
    assert loki["compactor"]["retention_enabled"] is True and loki["limits_config"]["retention_period"]
    assert loki["auth_enabled"] is False, "single tenant: promtail and Grafana send no tenant header"


def test_promtail_reads_the_services_log_files(compose: dict[str, Any]) -> None:
    service = compose["services"]["promtail"]
    promtail = _yaml(_config_file(service, "-config.file="))
    (scrape,) = promtail["scrape_configs"]
    (static,) = scrape["static_configs"]
    pattern = Path(static["labels"]["__path__"])
    exclude = Path(static["labels"]["__path_exclude__"])
    # /var/log/voxserve/**/*.log: the volume's files and those of each inference replica's directory.
    assert pattern.parent.name == "**"
    log_dir = str(pattern.parent.parent)
    assert pattern.name == "*.log" and exclude == pattern.parent / "*.error.log"
    mounts = {m.split(":")[1]: m.split(":") for m in service["volumes"]}
    volume, _, mode = mounts[log_dir]
    assert mode == "ro"
    for name in VOXSERVE_SERVICES:
        other = compose["services"][name]
        flags = [a for a in other["command"] if str(a).startswith("--log-dir=")]
        assert flags in ([f"--log-dir={log_dir}"], [f"--log-dir={log_dir}/{{hostname}}"]), name
        assert f"{volume}:{log_dir}" in other["volumes"], f"{name} writes its logs elsewhere"
    positions = Path(promtail["positions"]["filename"]).parent
    assert str(positions) in _mounts(service), "positions survive a restart (no re-shipping)"


def test_promtail_pushes_to_loki(compose: dict[str, Any], datasources: dict[str, dict[str, Any]]) -> None:
    promtail = _yaml(_config_file(compose["services"]["promtail"], "-config.file="))
    loki = _yaml(_config_file(compose["services"]["loki"], "-config.file="))
    (client,) = promtail["clients"]
    host, port = _host_port(client["url"])
    assert host == "loki" and port == loki["server"]["http_listen_port"]
    assert urlsplit(client["url"]).path == "/loki/api/v1/push"
    assert _host_port(datasources["loki"]["url"]) == (host, port)


def _real_log_line() -> dict[str, Any]:
    """One JSON line as the services write it, inside a span and a job's log context."""
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    handler.addFilter(ContextFilter("inference_service"))
    logger = logging.getLogger("tests.deploy.observability")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        with tracer.start_as_current_span("work"), log_context(job_id="job-42", model_id="whisper-tiny.en"):
            logger.warning("segment decoded")
    finally:
        logger.removeHandler(handler)
        provider.shutdown()
    line: dict[str, Any] = json.loads(stream.getvalue())
    line["_raw"] = stream.getvalue().strip()
    return line


def test_promtail_extracts_fields_a_real_log_line_has(compose: dict[str, Any]) -> None:
    promtail = _yaml(_config_file(compose["services"]["promtail"], "-config.file="))
    (scrape,) = promtail["scrape_configs"]
    stages = {next(iter(stage)): next(iter(stage.values())) for stage in scrape["pipeline_stages"]}
    line = _real_log_line()
    expressions = stages["json"]["expressions"]
    for name, field in expressions.items():
        assert field in line, f"voxserve log lines have no {field!r} (promtail extracts it as {name})"
    labels = set(stages["labels"]) | set(scrape["static_configs"][0]["labels"]) - {"__path__", "__path_exclude__"}
    assert labels <= BOUNDED_LABELS, f"unbounded labels: {labels - BOUNDED_LABELS}"
    assert {"trace_id", "job_id", "model_id"} <= set(stages["structured_metadata"])
    assert set(stages["labels"]) | set(stages["structured_metadata"]) <= set(expressions)
    assert stages["timestamp"]["source"] in expressions
    assert stages["timestamp"]["format"] == "RFC3339Nano"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])


def test_grafana_data_sources_point_at_the_compose_services(
    compose: dict[str, Any], datasources: dict[str, dict[str, Any]]
) -> None:
    assert set(datasources) == {"prometheus", "loki", "tempo"}
    tempo = _yaml(_config_file(compose["services"]["tempo"], "-config.file="))
    loki = _yaml(_config_file(compose["services"]["loki"], "-config.file="))
    ports = {
        "tempo": tempo["server"]["http_listen_port"],
        "loki": loki["server"]["http_listen_port"],
        "prometheus": 9090,
    }
    for uid, source in datasources.items():
        assert source["type"] == uid
        host, port = _host_port(source["url"])
        assert host in compose["services"] and port == ports[uid], uid
        assert host in compose["services"]["grafana"]["depends_on"], f"grafana does not wait for {host}"
    grafana_mounts = {m.split(":")[0]: m.split(":")[1] for m in compose["services"]["grafana"]["volumes"]}
    assert grafana_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


def test_logs_link_to_traces_and_traces_to_logs(
    compose: dict[str, Any], datasources: dict[str, dict[str, Any]]
) -> None:
    line = _real_log_line()
    (derived,) = datasources["loki"]["jsonData"]["derivedFields"]
    assert derived["datasourceUid"] == "tempo"
    # Grafana's provisioning turns $$ into $: the link is the matched value.
    assert derived["url"] == "$${__value.raw}"
    match = re.search(derived["matcherRegex"], line["_raw"])
    assert match and match.group(1) == line["trace_id"], "the derived field finds a real line's trace id"

    to_logs = datasources["tempo"]["jsonData"]["tracesToLogsV2"]
    assert to_logs["datasourceUid"] == "loki"
    promtail = _yaml(_config_file(compose["services"]["promtail"], "-config.file="))
    job = promtail["scrape_configs"][0]["static_configs"][0]["labels"]["job"]
    assert to_logs["query"] == f'{{job="{job}"}} | trace_id="$${{__trace.traceId}}"'
    assert datasources["tempo"]["jsonData"]["lokiSearch"]["datasourceUid"] == "loki"


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def _explore(url: str) -> dict[str, Any]:
    """The Explore pane a dashboard link opens (variables left as Grafana fills them)."""
    assert url.startswith("/explore?")
    query = urllib.parse.parse_qs(urlsplit(url).query)
    panes: dict[str, Any] = json.loads(query["panes"][0])
    (pane,) = panes.values()
    return dict(pane)


@pytest.mark.parametrize("name", ["inference.json", "model-store.json"])
def test_dashboards_link_a_job_to_its_logs_and_trace(name: str) -> None:
    board = json.loads((DEPLOY / "grafana" / "dashboards" / name).read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["job_id"]["type"] == variables["trace_id"]["type"] == "textbox"
    promtail = _yaml(DEPLOY / "promtail" / "promtail.yaml")
    job = promtail["scrape_configs"][0]["static_configs"][0]["labels"]["job"]
    logs_panels = [p for p in _panels(board) if p["type"] == "logs"]
    assert logs_panels
    for panel in logs_panels:
        for target in panel["targets"]:
            assert target["expr"].startswith(f'{{job="{job}"'), target["expr"]
    targets = {link["title"]: _explore(link["url"]) for p in _panels(board) for link in p.get("links", [])}
    logs = next(pane for title, pane in targets.items() if title.startswith("Logs of job"))
    assert logs["datasource"] == "loki"
    (query,) = logs["queries"]
    assert query["expr"] == f'{{job="{job}"}} | job_id="${{job_id:percentencode}}"'
    trace = next(pane for title, pane in targets.items() if title.startswith("Trace"))
    assert trace["datasource"] == "tempo"
    assert trace["queries"][0]["query"] == "${trace_id:percentencode}"
    assert logs["range"] == {"from": "${__from}", "to": "${__to}"}


def test_the_jobs_panel_links_to_logs_and_trace() -> None:
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "inference.json").read_text())
    (jobs,) = [p for p in _panels(board) if p["title"] == "Jobs finished by outcome"]
    titles = [link["title"] for link in jobs["links"]]
    assert any(t.startswith("Logs of job") for t in titles) and any(t.startswith("Trace") for t in titles)
