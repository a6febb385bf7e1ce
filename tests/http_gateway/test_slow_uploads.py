"""Slow uploads against the real gateway: a body that has not all arrived within
upload_timeout_seconds gets 408 and its connection is closed, whether the client stalls or
trickles; an over-limit body is not drained past that bound either."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable

import pytest

from tests.http_gateway.conftest import TEST_UPLOAD_LIMIT, GatewayHandle

UPLOAD_TIMEOUT = 2.0
ROUTE = "/v1/audio/transcriptions"
HEAD = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'


def start_upload(port: int, declared: int, first: bytes) -> socket.socket:
    """POST with Content-Length ``declared``, of which only ``first`` is sent now."""
    client = socket.create_connection(("127.0.0.1", port), timeout=60)
    request = (
        f"POST {ROUTE} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    client.sendall(request + first)
    return client


def answer_of(client: socket.socket, trickle: bool, limit: float = 60.0) -> bytes:
    """Everything the gateway sends until it closes the connection; with ``trickle`` one more
    byte of the body goes out every 0.2 s until the answer starts (a generous bound: the test
    fails rather than hang if the gateway never answers)."""
    end = time.monotonic() + limit
    while trickle and time.monotonic() < end:
        readable, _, _ = select.select([client], [], [], 0.2)
        if readable:
            break
        try:
            client.sendall(b"\0")
        except OSError:  # closed under us: its answer is already in our buffer
            break
    answer = b""
    while (left := end - time.monotonic()) > 0:
        client.settimeout(left)
        try:
            chunk = client.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            continue
        if not chunk:
            return answer
        answer += chunk
    raise AssertionError(f"the gateway did not close the connection; got {answer[:300]!r}")


def parse(answer: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


def count(gateway: GatewayHandle, status: str) -> float:
    labels = {"route": ROUTE, "status": status}
    return gateway.server.metrics.registry.get_sample_value("voxserve_http_requests_total", labels) or 0.0


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickling"])
def test_an_upload_that_does_not_finish_in_time_is_408_and_its_connection_closed(
    start_gateway: Callable[..., GatewayHandle], trickle: bool
) -> None:
    gateway = start_gateway(upload_timeout_seconds=UPLOAD_TIMEOUT)
    clients = [start_upload(gateway.server.port, 1 << 20, HEAD + b"\0" * 1000) for _ in range(5)]
    try:
        answers = [parse(answer_of(client, trickle)) for client in clients]
    finally:
        for client in clients:
            client.close()
    for status, headers, body in answers:
        assert status == 408
        assert headers["connection"] == "close"
        error = body["error"]
        assert isinstance(error, dict) and error["code"] == "upload_timeout"
        assert "upload_timeout_seconds" in error["message"]
    assert count(gateway, "408") == 5  # each request ended, and was logged and counted
    with gateway.http() as http:
        assert http.get("/healthz").status_code == 200


def test_an_over_limit_body_is_not_drained_past_the_upload_timeout(
    start_gateway: Callable[..., GatewayHandle],
) -> None:
    """The 413 for a declared size over the limit reads the body it refuses (so the client sees
    the answer), but no longer than the upload bound: a stalled client gets its 413 and is closed."""
    gateway = start_gateway(upload_timeout_seconds=UPLOAD_TIMEOUT)
    client = start_upload(gateway.server.port, TEST_UPLOAD_LIMIT + 1, HEAD)
    try:
        status, headers, body = parse(answer_of(client, trickle=False))
    finally:
        client.close()
    assert status == 413 and headers["connection"] == "close"
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == "upload_too_large"
