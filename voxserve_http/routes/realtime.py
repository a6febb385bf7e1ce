"""``GET /v1/realtime?intent=transcription``: OpenAI's Realtime transcription protocol over a
WebSocket, each session's audio going to live streams of the inference service
(StreamingTranscribe).

Credentials as for the other routes: an ``Authorization: Bearer`` header, or, from a browser
(which cannot set headers on a WebSocket), the subprotocols OpenAI's own browser clients send:
``realtime, openai-insecure-api-key.<token>``. The token is checked before the upgrade, by the
inference service, on the role live streams need: a refused handshake is the same 401/403 as
elsewhere, with OpenAI's error JSON.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse

from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve_http import validation
from voxserve_http.clients import INFERENCE
from voxserve_http.errors import ApiError
from voxserve_http.realtime.protocol import BETA, GA, SessionConfig, error_event
from voxserve_http.realtime.session import CLOSE_TRY_AGAIN_LATER, RealtimeSession
from voxserve_http.state import Gateway, authorization, gateway

router = APIRouter(tags=["OpenAI-compatible"])

SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL = "openai-insecure-api-key."
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket, intent: str | None = None, model: str | None = None) -> None:
    gw = gateway(websocket)
    offered = list(websocket.scope.get("subprotocols", ()))
    key = next((p.removeprefix(KEY_SUBPROTOCOL) for p in offered if p.startswith(KEY_SUBPROTOCOL)), None)
    credentials = authorization(websocket, f"Bearer {key}" if key else None)
    try:
        if intent != "transcription":
            raise ApiError(
                400,
                "this endpoint serves transcription sessions only: connect to /v1/realtime?intent=transcription",
                code="unsupported_intent",
                param="intent",
            )
        name = (model or "").strip()
        if name:
            validation.model_id(name, param="model")
        await _check_access(gw, credentials)
    except ApiError as error:
        await _refuse(websocket, error)
        return
    beta = BETA_SUBPROTOCOL in offered or "realtime=v1" in websocket.headers.get("openai-beta", "")
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    if gw.realtime_sessions >= gw.config.realtime_max_sessions:
        await _turn_away(gw, websocket)
        return
    gw.realtime_sessions += 1
    gw.metrics.realtime_sessions.inc()
    session = RealtimeSession(websocket, gw, credentials, SessionConfig(model=name), BETA if beta else GA)
    try:
        await session.run()
    finally:
        gw.realtime_sessions -= 1
        gw.metrics.realtime_sessions.dec()
        gw.metrics.realtime_sessions_ended.labels(session.outcome).inc()


async def _check_access(gw: Gateway, credentials: str | None) -> None:
    """Ask the inference service whether these credentials may transcribe, before the upgrade:
    CancelJob needs the role StreamingTranscribe needs, and for a job id nobody has it changes
    nothing and answers NOT_FOUND. An unreachable service is 503 here too."""
    probe = ipb.CancelJobRequest(job_id=f"realtime-access-check-{uuid.uuid4().hex}")
    try:
        await gw.backends.unary(INFERENCE, gw.backends.inference.CancelJob, probe, credentials)
    except ApiError as error:
        if error.status != 404:
            raise


async def _refuse(websocket: WebSocket, error: ApiError) -> None:
    """An HTTP answer instead of the upgrade (the status and OpenAI's error JSON)."""
    response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # a server without the denial-response extension
        await websocket.close(1008, error.message[:120])


async def _turn_away(gw: Gateway, websocket: WebSocket) -> None:
    message = (
        f"{gw.realtime_sessions} realtime sessions are open, the gateway's limit (realtime_max_sessions); retry later"
    )
    await websocket.send_json(error_event(message, "session_limit_reached", kind="rate_limit_error"))
    await websocket.close(CLOSE_TRY_AGAIN_LATER, "too many sessions")
    gw.metrics.realtime_sessions_ended.labels("refused").inc()
