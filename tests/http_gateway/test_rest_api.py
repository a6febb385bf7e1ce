"""REST model management through the gateway: the store pulls from the loopback hub,
progress comes as NDJSON, watches as server-sent events resumable with Last-Event-ID."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest

from inference_service.jobs import JobState
from tests.http_gateway.conftest import GatewayHandle, long_wav, sse_events
from tests.hubserver import HubServer
from tests.support import DATA_DIR, InferenceHandle, wait_for


def ndjson_lines(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if line:
            yield json.loads(line)


def pull(http: httpx.Client, model_id: str) -> list[dict[str, Any]]:
    with http.stream("POST", f"/api/models/{model_id}/pull") as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return list(ndjson_lines(response))


def test_pull_streams_progress_lines_until_ready(gateway: GatewayHandle, hub: HubServer) -> None:
    hub.throttle(40 << 20, path="model.bin")  # ~2 s for 75 MB: progress events in between
    with gateway.http() as http:
        lines = pull(http, "test-tiny")
        hub.throttle(None)
        assert all(line["model_id"] == "test-tiny" for line in lines)
        assert lines[-1]["state"] == "READY" and lines[-1]["type"] == "STATE_CHANGED"
        assert "DOWNLOADING" in [line["state"] for line in lines]
        progress = [line for line in lines if line["type"] == "PROGRESS"]
        assert progress, "a throttled download reports progress"
        done = [line["bytes_done"] for line in progress]
        assert all(isinstance(n, int) for n in done) and done == sorted(done)
        sequences = [line["sequence"] for line in lines]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
        model = http.get("/api/models/test-tiny").json()
        assert model["state"] == "READY" and model["kind"] == "WHISPER"
        assert {f["path"] for f in model["files"]} >= {"model.bin", "config.json"}
        again = pull(http, "test-tiny")  # READY and intact: one event at once
        assert [line["state"] for line in again] == ["READY"]


def test_pull_of_an_unknown_model_is_404(gateway: GatewayHandle) -> None:
    with gateway.http() as http:
        answer = http.post("/api/models/no-such-model/pull")
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "model_not_found"
        assert answer.json()["error"]["param"] == "id"


def _read_until(events: Iterator[dict[str, Any]], done: Any) -> list[dict[str, Any]]:
    seen = []
    for event in events:
        seen.append(event)
        if done(event):
            return seen
    raise AssertionError(f"the stream ended before the expected event: {seen}")


def _ready(model_id: str) -> Any:
    return lambda e: (
        e.get("event") == "state_changed" and e["data"]["model_id"] == model_id and e["data"]["state"] == "READY"
    )


def test_events_resume_after_last_event_id(gateway: GatewayHandle) -> None:
    with gateway.http() as http, gateway.http() as puller:
        with http.stream("GET", "/api/events", params={"model_id": "test-text"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response.iter_lines())
            snapshot = _read_until(events, lambda e: e.get("event") == "snapshot_end")
            assert [e["data"]["model_id"] for e in snapshot if e["event"] == "snapshot"] == ["test-text"]
            thread = threading.Thread(target=pull, args=(puller, "test-text"), daemon=True)
            thread.start()
            first = _read_until(events, _ready("test-text"))
            thread.join(60)
        live = [e for e in first if e["event"] != "heartbeat"]
        assert all(e["id"] == e["data"]["sequence"] for e in live)
        assert len(live) >= 3
        resume_after = live[0]["id"]
        with http.stream(
            "GET", "/api/events", params={"model_id": "test-text"}, headers={"Last-Event-ID": str(resume_after)}
        ) as response:
            again = _read_until(sse_events(response.iter_lines()), _ready("test-text"))
        replayed = [(e["id"], e["event"], e["data"]["state"]) for e in again if e["event"] != "heartbeat"]
        assert replayed == [(e["id"], e["event"], e["data"]["state"]) for e in live[1:]]
        # ?after_sequence= is the same for clients that cannot set headers
        with http.stream(
            "GET", "/api/events", params={"model_id": "test-text", "after_sequence": resume_after}
        ) as response:
            by_query = _read_until(sse_events(response.iter_lines()), _ready("test-text"))
        assert [e["id"] for e in by_query if e["event"] != "heartbeat"] == [e["id"] for e in live[1:]]


def test_delete_removes_a_model(gateway: GatewayHandle) -> None:
    with gateway.http() as http:
        assert pull(http, "test-text")[-1]["state"] == "READY"
        deleted = http.delete("/api/models/test-text")
        assert deleted.status_code == 200
        assert deleted.json()["state"] == "NOT_DOWNLOADED"
        assert http.get("/api/models/test-text").json()["state"] == "NOT_DOWNLOADED"
        assert http.delete("/api/models/no-such-model").status_code == 404


def test_cancel_stops_a_running_pull(gateway: GatewayHandle, hub: HubServer) -> None:
    hub.throttle(1 << 20, path="model.bin")  # 75 s for model.bin: it is still downloading when cancelled
    lines: list[dict[str, Any]] = []
    downloading = threading.Event()

    def run() -> None:
        with gateway.http() as http, http.stream("POST", "/api/models/test-tiny/pull") as response:
            for line in ndjson_lines(response):
                lines.append(line)
                if line.get("state") == "DOWNLOADING":
                    downloading.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert downloading.wait(60), lines
    try:
        with gateway.http() as http:
            cancelled = http.post("/api/models/test-tiny/cancel")
            assert cancelled.status_code == 200, cancelled.text
            thread.join(60)
            assert not thread.is_alive()
            assert "error" in lines[-1], lines[-1]
            assert lines[-1]["error"]["code"] == "cancelled"
            # the files already in place stay (a later pull fetches only the rest); model.bin does not
            assert cancelled.json()["state"] in ("INCOMPLETE", "NOT_DOWNLOADED")
            model = http.get("/api/models/test-tiny").json()
            assert model["state"] in ("INCOMPLETE", "NOT_DOWNLOADED")
            assert not any(f["path"] == "model.bin" and f["present"] for f in model["files"])
    finally:
        hub.throttle(None)


def test_job_events_resume_after_last_event_id(gateway: GatewayHandle) -> None:
    with gateway.http() as http:
        answer = http.post(
            "/v1/audio/transcriptions",
            files={"file": ("short.wav", (DATA_DIR / "speech_short.wav").read_bytes())},
            data={"model": "whisper-1", "job_id": "gw-job-1"},
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-voxserve-job-id"] == "gw-job-1"
        with http.stream("GET", "/api/jobs/gw-job-1/events") as response:
            assert response.status_code == 200
            events = list(sse_events(response.iter_lines()))
        assert events[0]["event"] == "accepted" and events[-1]["event"] == "completed"
        assert "segment" in [e["event"] for e in events]
        ids = [e["id"] for e in events]
        assert ids == list(range(1, len(ids) + 1))
        assert events[-1]["data"]["completed"]["text"] == answer.json()["text"]
        with http.stream("GET", "/api/jobs/gw-job-1/events", headers={"Last-Event-ID": str(ids[1])}) as response:
            resumed = list(sse_events(response.iter_lines()))
        assert [e["id"] for e in resumed] == ids[2:]
        unknown = http.get("/api/jobs/no-such-job/events")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "job_not_found"


def test_cancel_stops_a_running_job(gateway: GatewayHandle, services: InferenceHandle) -> None:
    job_id = "gw-cancel-1"
    answers: list[httpx.Response] = []

    def transcribe() -> None:
        with gateway.http() as http:
            files = {"file": ("long.wav", long_wav(4))}
            answers.append(http.post("/v1/audio/transcriptions", files=files, data={"job_id": job_id}))

    thread = threading.Thread(target=transcribe, daemon=True)
    thread.start()
    with gateway.http() as http:
        # the job's event stream stays open while it runs: its first segment is enough
        wait_for(lambda: _first_segment(http, job_id), timeout=120, message="the job decodes")
        cancelled = http.post(f"/api/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json() == {"job_id": job_id, "state": "JOB_CANCELLED"}
        thread.join(120)
        assert not thread.is_alive()
        (answer,) = answers
        assert answer.status_code == 409, answer.text  # the job's own request learns why it ended
        assert answer.json()["error"]["code"] == "cancelled"
        assert services.app.jobs.get(job_id).state == JobState.CANCELLED
        again = http.post(f"/api/jobs/{job_id}/cancel")  # an ended job answers its final state
        assert again.status_code == 200 and again.json()["state"] == "JOB_CANCELLED"
        unknown = http.post("/api/jobs/no-such-job/cancel")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "job_not_found" and unknown.json()["error"]["param"] == "id"


def _first_segment(http: httpx.Client, job_id: str) -> bool:
    """True once the job exists and a segment event arrived (the stream is read only that far)."""
    with http.stream("GET", f"/api/jobs/{job_id}/events") as response:
        if response.status_code == 404:
            return False
        assert response.status_code == 200, response.read()
        for event in sse_events(response.iter_lines()):
            if event.get("event") == "segment":
                return True
    return False


def test_loaded_lists_the_inference_cache(gateway: GatewayHandle, services: InferenceHandle) -> None:
    with gateway.http() as http:
        assert http.get("/api/loaded").json() == {"models": []}
        answer = http.post(
            "/v1/audio/transcriptions", files={"file": ("s.wav", (DATA_DIR / "speech_short.wav").read_bytes())}
        )
        assert answer.status_code == 200
        # The Whisper model, and the VAD model of the fast first segment when the store has one.
        by_id = {m["model_id"]: m for m in http.get("/api/loaded").json()["models"]}
        assert set(by_id) <= {"whisper-tiny.en", "silero-vad"}
        loaded = by_id["whisper-tiny.en"]
        assert isinstance(loaded["memory_bytes"], int) and loaded["memory_bytes"] > 0
        assert loaded["loaded_at"].endswith("Z")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/api/models/..%2F..%2Fetc%2Fpasswd", 404, "unknown_route"),
        ("POST", "/api/models/..%2Fsecret/pull", 404, "unknown_route"),
        ("DELETE", "/api/models/..%2F..%2Fstore", 404, "unknown_route"),
        ("GET", "/api/models/%2E%2E", 400, "invalid_model_id"),
        ("DELETE", "/api/models/..", 404, "unknown_route"),
        ("POST", "/api/models/whisper%00tiny/cancel", 400, "invalid_model_id"),
        ("GET", "/api/models/UPPER-case", 400, "invalid_model_id"),
        ("GET", "/v1/models/%2E%2E%2Fx", 404, "unknown_route"),
        ("GET", "/v1/models/a..b", 400, "invalid_model_id"),
        ("GET", "/api/jobs/..%2F..%2Fx/events", 404, "unknown_route"),
        ("GET", "/api/jobs/a%20b/events", 400, "invalid_job_id"),
        ("GET", "/api/jobs/x..y/events", 400, "invalid_job_id"),
        ("POST", "/api/jobs/a%20b/cancel", 400, "invalid_job_id"),
        ("POST", "/api/jobs/..%2F..%2Fx/cancel", 404, "unknown_route"),
        ("GET", "/api/events?model_id=..%2Fx", 400, "invalid_model_id"),
        ("GET", "/api/models?kind=../whisper", 400, "invalid_argument"),
    ],
)
def test_hostile_ids_never_reach_the_backends(
    gateway: GatewayHandle, services: InferenceHandle, method: str, path: str, status: int, code: str
) -> None:
    registry = services.store.store.metrics.registry
    rpcs = ("GetModel", "PullModel", "DeleteModel", "CancelDownload", "WatchModels", "ListModels")

    def started() -> dict[str, float]:  # the inference service itself calls ListModels at start-up
        def count(rpc: str) -> float:
            labels = {"method": f"/voxserve.modelstore.v1.ModelStore/{rpc}"}
            return registry.get_sample_value("voxserve_rpc_started_total", labels) or 0.0

        return {rpc: count(rpc) for rpc in rpcs}

    before = started()
    with gateway.http() as http:
        answer = http.request(method, path)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert started() == before


def test_bad_last_event_id_is_400(gateway: GatewayHandle) -> None:
    with gateway.http() as http:
        for value in ("abc", "-1", "1.5", str(1 << 64)):
            answer = http.get("/api/events", headers={"Last-Event-ID": value})
            assert answer.status_code == 400, value
            assert answer.json()["error"]["param"] == "Last-Event-ID"


def test_a_missing_file_is_400_naming_it(gateway: GatewayHandle) -> None:
    with gateway.http() as http:
        answer = http.post("/v1/audio/transcriptions", data={"model": "whisper-1"})
        assert answer.status_code == 400
        assert answer.json()["error"] == {
            "message": "file is required: send the audio as the multipart/form-data field 'file'",
            "type": "invalid_request_error",
            "param": "file",
            "code": "missing_file",
        }
        as_json = http.post("/v1/audio/transcriptions", json={"model": "whisper-1"})
        assert as_json.status_code == 400
        assert http.get("/no/such/route").json()["error"]["code"] == "unknown_route"
        assert http.put("/v1/models").status_code == 405


def test_metrics_label_routes_by_template(gateway: GatewayHandle) -> None:
    with gateway.http() as http:
        http.get("/api/models/test-tiny")
        http.get("/api/models/no-such-model")
        http.get("/random/path/1")
        http.post("/v1/audio/transcriptions", files={"file": ("big.wav", b"\0" * (7 << 20))})
    registry = gateway.server.metrics.registry
    value = registry.get_sample_value
    # A request is counted when its handling ends, just after the client has the answer.
    wait_for(
        lambda: value("voxserve_http_request_duration_seconds_count", {"route": "/v1/audio/transcriptions"}),
        timeout=30,
        message="the last request counted",
    )
    assert value("voxserve_http_requests_total", {"route": "/api/models/{id}", "status": "200"}) == 1
    assert value("voxserve_http_requests_total", {"route": "/api/models/{id}", "status": "404"}) == 1
    assert value("voxserve_http_requests_total", {"route": "unmatched", "status": "404"}) == 1
    assert value("voxserve_http_requests_total", {"route": "/v1/audio/transcriptions", "status": "413"}) == 1
    assert value("voxserve_http_request_duration_seconds_count", {"route": "/api/models/{id}"}) == 2
    routes = {
        sample.labels.get("route")
        for family in registry.collect()
        for sample in family.samples
        if family.name.startswith("voxserve_http")
    }
    assert not any("test-tiny" in str(route) or "random" in str(route) for route in routes), routes


def test_openapi_document_and_docs(gateway: GatewayHandle) -> None:
    with gateway.http() as http:
        document = http.get("/openapi.json").json()
        docs = http.get("/docs")
    paths = document["paths"]
    for path in (
        "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/models", "/v1/models/{model}",
        "/api/models", "/api/models/{id}", "/api/models/{id}/pull", "/api/models/{id}/cancel",
        "/api/events", "/api/loaded", "/api/jobs/{id}/events", "/api/jobs/{id}/cancel", "/healthz", "/readyz",
    ):  # fmt: skip
        assert path in paths, path
    assert "delete" in paths["/api/models/{id}"]
    body = paths["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]["multipart/form-data"]
    schema_ref = body["schema"]["$ref"].rsplit("/", 1)[-1]
    fields = document["components"]["schemas"][schema_ref]["properties"]
    assert {"file", "model", "language", "prompt", "response_format", "timestamp_granularities[]", "stream"} <= set(
        fields
    )
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]


def test_docs_load_swagger_ui_from_the_gateway_not_a_cdn(gateway: GatewayHandle) -> None:
    with gateway.http() as http:
        page = http.get("/docs")
        assert page.status_code == 200, page.text
        html = page.text
        assert "://" not in html, html  # no absolute URL: no CDN, no other host
        referenced = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        referenced += re.findall(r"""url:\s*["']([^"']+)["']""", html)  # the OpenAPI document it loads
        assert referenced, html
        assert all(url.startswith("/") and not url.startswith("//") for url in referenced), referenced
        kinds = {}
        for url in referenced:
            answer = http.get(url)
            assert answer.status_code == 200, url
            assert len(answer.content) > 1000, url
            kinds[url.rsplit(".", 1)[-1]] = answer.headers["content-type"]
    assert "javascript" in kinds["js"], kinds
    assert "css" in kinds["css"], kinds
    assert "/openapi.json" in referenced
