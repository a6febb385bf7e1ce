"""Liveness and readiness for probes and load balancers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from voxserve_http.state import Gateway, gateway

router = APIRouter(tags=["Health"])


@router.get("/healthz", summary="The gateway process is up (liveness)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Ready for traffic: both gRPC backends SERVING and no shutdown under way (503 otherwise)",
    responses={503: {"description": "not ready; the body says which backend is not SERVING"}},
)
async def readyz(gw: Annotated[Gateway, Depends(gateway)]) -> JSONResponse:
    backends = await gw.backends.serving()
    ready = not gw.shutting_down.is_set() and all(status == "SERVING" for status in backends.values())
    body: dict[str, Any] = {
        "status": "ready" if ready else "not ready",
        "shutting_down": gw.shutting_down.is_set(),
        "backends": backends,
    }
    return JSONResponse(body, status_code=200 if ready else 503)
