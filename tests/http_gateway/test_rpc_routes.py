"""README's table of every RPC and its HTTP route stays true: every RPC of the three services
(from the generated descriptors) has one row, each route it names is a route of the gateway,
a row without a route says "gRPC only" and why, and every /v1 and /api route has a row."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.routing import WebSocketRoute

from voxserve.admin.v1 import admin_pb2
from voxserve.inference.v1 import inference_pb2
from voxserve.modelstore.v1 import modelstore_pb2
from voxserve_http.app import create_app
from voxserve_http.config import GatewayConfig

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "### Every RPC and its route"
ROW = re.compile(r"^\| `(?P<rpc>[A-Za-z]+/[A-Za-z]+)` \| (?P<route>.+) \|$")
ROUTE = re.compile(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`]*)`")


def _rpcs() -> set[str]:
    services = (
        modelstore_pb2.DESCRIPTOR.services_by_name["ModelStore"],
        inference_pb2.DESCRIPTOR.services_by_name["Inference"],
        admin_pb2.DESCRIPTOR.services_by_name["Admin"],
    )
    return {f"{service.name}/{method.name}" for service in services for method in service.methods}


def _table() -> dict[str, str]:
    text = README.read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n#", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            assert match["rpc"] not in rows, f"{match['rpc']} has two rows"
            rows[match["rpc"]] = match["route"]
    return rows


def _all_routes(routes: list[Any]) -> list[Any]:
    """Routes, with those of included routers (FastAPI keeps them behind the router)."""
    found: list[Any] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        found += _all_routes(inner.routes) if inner is not None else [route]
    return found


def _gateway_routes() -> set[tuple[str, str]]:
    """(METHOD, path template) of every route in the gateway's OpenAPI document, and its
    WebSocket routes (which OpenAPI does not describe) as GET, the upgrade's method."""
    app = create_app(GatewayConfig())
    paths = app.openapi()["paths"]
    websockets = {("GET", route.path) for route in _all_routes(app.routes) if isinstance(route, WebSocketRoute)}
    return websockets | {(method.upper(), path) for path, operations in paths.items() for method in operations}


def test_every_rpc_has_a_row_and_every_row_an_rpc() -> None:
    rows = _table()
    assert set(rows) == _rpcs()


def test_each_row_names_real_routes_or_says_why_not() -> None:
    served = _gateway_routes()
    for rpc, cell in _table().items():
        named = set(ROUTE.findall(cell))  # a gRPC-only row may point at a route that helps instead
        assert named <= served, f"{rpc}: {sorted(named - served)} are not routes of the gateway"
        if cell.startswith("gRPC only"):
            reason = cell.removeprefix("gRPC only:").strip()
            assert cell.startswith("gRPC only:") and len(reason) > 20, f"{rpc}: say 'gRPC only: <why>'"
        else:
            assert named, f"{rpc}: name its route(s), or say 'gRPC only: <why>'"


def test_every_api_route_of_the_gateway_is_in_the_table() -> None:
    named = {route for cell in _table().values() if not cell.startswith("gRPC only") for route in ROUTE.findall(cell)}
    api = {(method, path) for method, path in _gateway_routes() if path.startswith(("/v1/", "/api/"))}
    assert ("POST", "/api/jobs/{id}/cancel") in api and ("GET", "/v1/realtime") in api
    assert api - named == set()
