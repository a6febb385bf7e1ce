"""REST model management over the model store and the inference cache, streaming like
the gRPC API: pulls as NDJSON progress lines, watches as server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request

from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve.modelstore.v1 import modelstore_pb2 as mpb
from voxserve_http import validation
from voxserve_http.clients import INFERENCE, STORE, call_metadata
from voxserve_http.errors import ApiError, bad_request
from voxserve_http.formats import NDJSON_MEDIA_TYPE, SSE_MEDIA_TYPE, message_to_json, ndjson, sse
from voxserve_http.state import Gateway, authorization, gateway
from voxserve_http.streams import KEEPALIVE, STOPPED, ClosingStream, Prefetched

router = APIRouter(tags=["Model management"])

MODEL_NOT_FOUND = ("model_not_found", "id")
JOB_NOT_FOUND = ("job_not_found", "id")
KINDS = {"whisper": mpb.WHISPER, "vad": mpb.VAD, "demucs": mpb.DEMUCS, "diarization": mpb.DIARIZATION}
# How long an event stream waits for its first event before it answers 200 anyway: a
# backend that refuses (unknown job, bad sequence, no token) does so within
# milliseconds and gets its HTTP status; a quiet stream starts after this.
FIRST_EVENT_WAIT_SECONDS = 2.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

GatewayDep = Annotated[Gateway, Depends(gateway)]


@router.get("/api/models", summary="Every catalog model with its state")
async def list_models(
    request: Request,
    gw: GatewayDep,
    kind: Annotated[str | None, Query(description="whisper, vad, demucs or diarization")] = None,
) -> dict[str, Any]:
    wanted = mpb.MODEL_KIND_UNSPECIFIED
    if kind:
        if kind not in KINDS:
            raise bad_request(f"unknown kind {kind[:32]!r}; use one of {', '.join(KINDS)}", param="kind")
        wanted = KINDS[kind]
    reply = await gw.backends.unary(
        STORE, gw.backends.store.ListModels, mpb.ListModelsRequest(kind=wanted), authorization(request)
    )
    return {"models": [message_to_json(m) for m in reply.models]}


async def _model_rpc(gw: Any, request: Request, method: Any, message: Any) -> dict[str, Any]:
    """One store RPC that answers a Model, as JSON (404 for an unknown model)."""
    model = await gw.backends.unary(STORE, method, message, authorization(request), not_found=MODEL_NOT_FOUND)
    return message_to_json(model)


@router.get("/api/models/{id}", summary="One model with its files and state")
async def get_model(id: str, request: Request, gw: GatewayDep) -> dict[str, Any]:
    return await _model_rpc(
        gw, request, gw.backends.store.GetModel, mpb.GetModelRequest(model_id=validation.model_id(id))
    )


@router.delete("/api/models/{id}", summary="Remove a model's files (409 while it downloads)")
async def delete_model(id: str, request: Request, gw: GatewayDep) -> dict[str, Any]:
    return await _model_rpc(
        gw, request, gw.backends.store.DeleteModel, mpb.DeleteModelRequest(model_id=validation.model_id(id))
    )


@router.post("/api/models/{id}/cancel", summary="Stop a running or waiting download")
async def cancel_download(id: str, request: Request, gw: GatewayDep) -> dict[str, Any]:
    return await _model_rpc(
        gw, request, gw.backends.store.CancelDownload, mpb.CancelDownloadRequest(model_id=validation.model_id(id))
    )


@router.post(
    "/api/models/{id}/pause",
    summary="Pause a running or waiting download, keeping its bytes (PauseDownload; the store asks for admin)",
)
async def pause_download(id: str, request: Request, gw: GatewayDep) -> dict[str, Any]:
    return await _model_rpc(
        gw, request, gw.backends.store.PauseDownload, mpb.PauseDownloadRequest(model_id=validation.model_id(id))
    )


@router.post(
    "/api/models/{id}/resume",
    summary="Queue a paused download again; it continues from its bytes (ResumeDownload; admin)",
)
async def resume_download(id: str, request: Request, gw: GatewayDep) -> dict[str, Any]:
    return await _model_rpc(
        gw, request, gw.backends.store.ResumeDownload, mpb.ResumeDownloadRequest(model_id=validation.model_id(id))
    )


@router.post(
    "/api/models/{id}/pull",
    summary="Download a model; NDJSON progress lines (PullModel's events) until READY or an error line",
    responses={200: {"content": {NDJSON_MEDIA_TYPE: {}}}},
)
async def pull_model(
    id: str,
    request: Request,
    gw: GatewayDep,
    revision: Annotated[str | None, Query(description="branch, tag or commit; default from the catalog")] = None,
) -> ClosingStream:
    call = gw.backends.store.PullModel(
        mpb.PullModelRequest(model_id=validation.model_id(id), revision=(revision or "").strip()),
        timeout=gw.config.pull_timeout_seconds,
        metadata=call_metadata(authorization(request)),
    )
    events = Prefetched(gw.backends.stream(STORE, call, not_found=MODEL_NOT_FOUND))
    await _first(events, None)

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for event in events.items():
                yield ndjson(message_to_json(event))
        except ApiError as error:
            yield ndjson(error.body())

    return ClosingStream(lines(), events.aclose, media_type=NDJSON_MEDIA_TYPE, headers={"Cache-Control": "no-cache"})


@router.get(
    "/api/events",
    summary="Server-sent events of WatchModels: id = the event sequence, resumable with Last-Event-ID",
    responses={200: {"content": {SSE_MEDIA_TYPE: {}}}},
)
async def watch_models(
    request: Request,
    gw: GatewayDep,
    model_id: Annotated[list[str] | None, Query(description="only these models (repeatable)")] = None,
    after_sequence: Annotated[str | None, Query(description="resume after this sequence (as Last-Event-ID)")] = None,
    last_event_id: Annotated[str | None, Header(description="the id: of the last event received")] = None,
) -> ClosingStream:
    after = _after(last_event_id, after_sequence)
    wanted = [validation.model_id(m, param="model_id") for m in (model_id or ())]
    call = gw.backends.store.WatchModels(
        mpb.WatchModelsRequest(after_sequence=after, model_ids=wanted),
        metadata=call_metadata(authorization(request)),
    )
    events = Prefetched(gw.backends.stream(STORE, call, not_found=("model_not_found", "model_id")))
    return await _event_stream(gw, events, _model_event)


@router.get("/api/loaded", summary="The inference service's loaded models (ListLoadedModels)")
async def loaded_models(request: Request, gw: GatewayDep) -> dict[str, Any]:
    reply = await gw.backends.unary(
        INFERENCE, gw.backends.inference.ListLoadedModels, ipb.ListLoadedModelsRequest(), authorization(request)
    )
    return {"models": [message_to_json(m) for m in reply.models]}


@router.get(
    "/api/jobs/{id}/events",
    summary="Server-sent events of WatchJob: id = the job's event sequence, resumable with Last-Event-ID",
    responses={200: {"content": {SSE_MEDIA_TYPE: {}}}},
)
async def watch_job(
    id: str,
    request: Request,
    gw: GatewayDep,
    after_sequence: Annotated[str | None, Query(description="resume after this sequence (as Last-Event-ID)")] = None,
    last_event_id: Annotated[str | None, Header(description="the id: of the last event received")] = None,
) -> ClosingStream:
    after = _after(last_event_id, after_sequence)
    call = gw.backends.inference.WatchJob(
        ipb.WatchJobRequest(job_id=validation.job_id(id), after_sequence=after),
        metadata=call_metadata(authorization(request)),
    )
    events = Prefetched(gw.backends.stream(INFERENCE, call, not_found=JOB_NOT_FOUND))
    return await _event_stream(gw, events, _job_event)


@router.post(
    "/api/jobs/{id}/cancel",
    summary="Cancel a queued or running transcription job (CancelJob); answers its state",
)
async def cancel_job(id: str, request: Request, gw: GatewayDep) -> dict[str, Any]:
    """A job that already ended answers its final state; the job's own request (a
    transcription still waiting for its answer) then fails with 409 ``cancelled``."""
    reply = await gw.backends.unary(
        INFERENCE,
        gw.backends.inference.CancelJob,
        ipb.CancelJobRequest(job_id=validation.job_id(id)),
        authorization(request),
        not_found=JOB_NOT_FOUND,
    )
    return message_to_json(reply)


# --------------------------------------------------------------------------- helpers


def _after(last_event_id: str | None, after_sequence: str | None) -> int:
    if last_event_id is not None and last_event_id.strip():
        return validation.sequence(last_event_id, "Last-Event-ID")
    if after_sequence is not None and after_sequence.strip():
        return validation.sequence(after_sequence, "after_sequence")
    return 0


def _model_event(event: mpb.ModelEvent) -> bytes:
    return sse(message_to_json(event), event=mpb.EventType.Name(event.type).lower(), event_id=event.sequence)


def _job_event(event: ipb.TranscribeEvent) -> bytes:
    return sse(message_to_json(event), event=event.WhichOneof("event") or "event", event_id=event.sequence)


async def _first(events: Prefetched[Any], timeout: float | None) -> None:
    try:
        await events.wait_first(timeout)
    except BaseException:
        await events.aclose()
        raise


async def _event_stream(gw: Gateway, events: Prefetched[Any], encode: Any) -> ClosingStream:
    """SSE of ``events`` until they end, the client leaves or the gateway shuts down; a
    comment line on a quiet stream every sse_keepalive_seconds; a failure after the
    start is an ``error`` event in OpenAI's error shape."""
    gw.acquire_stream()
    try:
        await _first(events, FIRST_EVENT_WAIT_SECONDS)
    except BaseException:
        gw.release_stream()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b": connected\n\n"
            while True:
                item = await events.next(gw.config.sse_keepalive_seconds, gw.shutting_down)
                if item is KEEPALIVE:
                    yield b": keepalive\n\n"
                elif item is STOPPED:
                    yield sse(
                        {"message": "the gateway is shutting down; reconnect with Last-Event-ID"}, event="shutdown"
                    )
                    return
                elif isinstance(item, mpb.ModelEvent | ipb.TranscribeEvent):
                    yield encode(item)
                else:
                    return  # END
        except ApiError as error:
            yield sse(error.body(), event="error")

    async def close() -> None:
        gw.release_stream()
        await events.aclose()

    return ClosingStream(body(), close, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
