"""The ASGI application: routes, the error table's handlers and the middleware stack."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from voxserve_common.metrics import runtime_metrics
from voxserve_http.clients import Backends
from voxserve_http.config import GatewayConfig
from voxserve_http.errors import ApiError, from_rpc
from voxserve_http.limits import BodyLimitMiddleware, UploadRefused
from voxserve_http.metrics import GatewayMetrics, ObservabilityMiddleware
from voxserve_http.routes import console, health, models, openai, realtime
from voxserve_http.security import GatewaySecurity
from voxserve_http.state import Gateway

logger = logging.getLogger(__name__)

DESCRIPTION = """\
HTTP beside the gRPC services: OpenAI-compatible transcription (`/v1/audio/*`,
`/v1/models`) and REST model management (`/api/*`). Errors are OpenAI's
`{"error": {"message", "type", "param", "code"}}`. An `Authorization` header is passed to
the gRPC services as `authorization` metadata; a `traceparent` header continues the trace.
"""
# Swagger UI's script, style sheet and icon, served by the gateway itself from the
# fastapi-offline package: /docs works without reaching a CDN.
DOCS_ASSETS_URL = "/docs-assets"


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if isinstance(exc, UploadRefused):
        return error_response(exc.error)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; the routes are listed at /docs"
        return error_response(ApiError(404, message, code="unknown_route"))
    if exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(ApiError(405, message, code="method_not_allowed", headers=exc.headers))
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(ApiError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    param = None
    for item in exc.errors():
        location = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path", "header")]
        param = param or (location[-1] if location else None)
        problems.append(f"{'.'.join(location) or 'request'}: {item.get('msg', 'invalid')}")
    message = "; ".join(problems) or "the request is not valid"
    if request.headers.get("content-type", "").split(";")[0].strip() not in ("multipart/form-data", ""):
        message += " (send the fields as multipart/form-data)"
    return error_response(ApiError(400, message, param=param, code="invalid_request"))


async def _rpc_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, grpc.aio.AioRpcError)
    gw: Gateway = request.app.state.gateway
    return error_response(from_rpc(exc, "backend", gw.config.retry_after_seconds))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unexpected error in the gateway", exc_info=exc)
    message = "the gateway failed unexpectedly; its log has the details (search for this request's trace id)"
    return error_response(ApiError(500, message, type="server_error", code="internal"))


def create_app(
    config: GatewayConfig, metrics: GatewayMetrics | None = None, security: GatewaySecurity | None = None
) -> FastAPI:
    """The gateway's ASGI app; its lifespan opens the gRPC channels (TLS and backend token
    from ``security``; plaintext without it) and closes them."""
    metrics = metrics or GatewayMetrics()
    runtime = runtime_metrics(metrics.registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backends = Backends(config, security)
        gw = Gateway(config, backends, metrics)
        app.state.gateway = gw
        lag = asyncio.create_task(runtime.watch_event_loop(), name="event-loop-lag")
        logger.info(
            "http gateway ready",
            extra={"inference": config.inference, "model_store": config.model_store},
        )
        try:
            yield
        finally:
            gw.shutting_down.set()
            lag.cancel()
            await backends.close(grace=1.0)

    app = FastAPIOffline(
        title="voxserve HTTP gateway",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        static_url=DOCS_ASSETS_URL,
    )
    routers = (openai.router, realtime.router, models.router, health.router, console.router)
    for router in routers:
        app.include_router(router)
    console.mount_assets(app)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(grpc.aio.AioRpcError, _rpc_error)
    app.add_exception_handler(Exception, _unexpected)
    # Added last = outermost: every answer, the 413s and 408s included, is traced, counted and logged.
    app.add_middleware(BodyLimitMiddleware, limit=config.max_upload_bytes, timeout=config.upload_timeout_seconds)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, routes=[r for x in routers for r in x.routes])
    return app
