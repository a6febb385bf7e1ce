"""OpenAI-compatible routes: /v1/audio/transcriptions, /v1/audio/translations, /v1/models.

The request fields and answers follow OpenAI's Audio API so that its SDKs work with a
``base_url`` pointing here; each request becomes one Transcribe call (TranscribeStream for
audio over 60 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve.modelstore.v1 import modelstore_pb2 as mpb
from voxserve_http import validation
from voxserve_http.clients import INFERENCE, SINGLE_MESSAGE_AUDIO_BYTES, STORE, audio_chunks, call_metadata
from voxserve_http.errors import ApiError, bad_request
from voxserve_http.formats import MEDIA_TYPES, RESPONSE_FORMATS, SSE_MEDIA_TYPE, Transcript, sse
from voxserve_http.state import Gateway, authorization, gateway
from voxserve_http.streams import ClosingStream, Prefetched

router = APIRouter(tags=["OpenAI-compatible"])


@dataclass(frozen=True)
class Speakers:
    """What a transcription asks of diarization: whether to label speakers, and known voices."""

    diarize: bool = False
    known: list[tuple[str, bytes]] = field(default_factory=list)


GRANULARITIES = ("word", "segment")
STREAM_FORMATS = ("json", "text")
MODEL_NOT_FOUND = ("model_not_found", "model")
JOB_ID_HEADER = "X-Voxserve-Job-Id"
# Events after which a stream=true answer starts: by then the audio is decoded and the
# model loaded, so a bad file or an unknown model was answered with its HTTP status.
_STARTED = ("info", "segment", "completed")

FileField = Annotated[UploadFile | None, File(description="The audio file (any format PyAV decodes).")]
ModelField = Annotated[
    str | None, Form(description="A Whisper model id of the store; 'whisper-1' (or empty) = the service default.")
]
PromptField = Annotated[str | None, Form(description="Text to guide the style or continue a previous part.")]
TemperatureField = Annotated[
    str | None,
    Form(description="0-1: 0 = greedy/beam search, above 0 = sampling; absent = 0 with fallback to higher values."),
]
FormatField = Annotated[
    str | None,
    Form(description="json (default), text, srt, vtt, verbose_json or diarized_json (segments with their speaker)."),
]
DiarizeField = Annotated[
    str | None,
    Form(
        description="voxserve extension: true labels each segment and word with its speaker (verbose_json, srt, vtt); "
        "diarized_json and known speakers imply it."
    ),
]
SpeakerNamesField = Annotated[
    list[str] | None, Form(alias="known_speaker_names[]", description="Up to 4 names of speakers to recognise.")
]
SpeakerNamesPlainField = Annotated[list[str] | None, Form(alias="known_speaker_names", include_in_schema=False)]
SpeakerReferencesField = Annotated[
    list[str] | None,
    Form(
        alias="known_speaker_references[]",
        description="One clip per name, as a data URL (data:audio/wav;base64,...), of that speaker alone.",
    ),
]
SpeakerReferencesPlainField = Annotated[
    list[str] | None, Form(alias="known_speaker_references", include_in_schema=False)
]
GranularityField = Annotated[
    list[str] | None,
    Form(alias="timestamp_granularities[]", description="word and/or segment; needs verbose_json."),
]
GranularityPlainField = Annotated[list[str] | None, Form(alias="timestamp_granularities", include_in_schema=False)]
StreamField = Annotated[
    str | None, Form(description="true: server-sent events transcript.text.delta, then transcript.text.done.")
]
JobIdField = Annotated[
    str | None,
    Form(description="voxserve extension: name the job so it survives a disconnect (GET /api/jobs/{id}/events)."),
]


@router.post(
    "/v1/audio/transcriptions",
    summary="Transcribe audio into the input language",
    responses={200: {"content": {"text/plain": {}, "text/event-stream": {}, "text/vtt": {}}}},
)
async def create_transcription(
    request: Request,
    gw: Annotated[Gateway, Depends(gateway)],
    file: FileField = None,
    model: ModelField = None,
    language: Annotated[str | None, Form(description="ISO 639-1 code; empty = detect.")] = None,
    prompt: PromptField = None,
    temperature: TemperatureField = None,
    response_format: FormatField = None,
    timestamp_granularities: GranularityField = None,
    timestamp_granularities_plain: GranularityPlainField = None,
    stream: StreamField = None,
    job_id: JobIdField = None,
    diarize: DiarizeField = None,
    known_speaker_names: SpeakerNamesField = None,
    known_speaker_names_plain: SpeakerNamesPlainField = None,
    known_speaker_references: SpeakerReferencesField = None,
    known_speaker_references_plain: SpeakerReferencesPlainField = None,
) -> Response:
    granularities = [*(timestamp_granularities or ()), *(timestamp_granularities_plain or ())]
    known = validation.known_speakers(
        [*(known_speaker_names or ()), *(known_speaker_names_plain or ())],
        [*(known_speaker_references or ()), *(known_speaker_references_plain or ())],
    )
    speakers = Speakers(validation.boolean(diarize, "diarize") or bool(known), known)
    return await _transcribe(
        request, gw, ipb.TRANSCRIBE, file, model, validation.language(language), prompt, temperature,
        response_format, granularities, stream, job_id, speakers,
    )  # fmt: skip


@router.post(
    "/v1/audio/translations",
    summary="Translate audio into English",
    responses={200: {"content": {"text/plain": {}, "text/event-stream": {}, "text/vtt": {}}}},
)
async def create_translation(
    request: Request,
    gw: Annotated[Gateway, Depends(gateway)],
    file: FileField = None,
    model: ModelField = None,
    prompt: PromptField = None,
    temperature: TemperatureField = None,
    response_format: FormatField = None,
    timestamp_granularities: GranularityField = None,
    timestamp_granularities_plain: GranularityPlainField = None,
    stream: StreamField = None,
    job_id: JobIdField = None,
) -> Response:
    granularities = [*(timestamp_granularities or ()), *(timestamp_granularities_plain or ())]
    return await _transcribe(
        request, gw, ipb.TRANSLATE, file, model, "", prompt, temperature, response_format, granularities, stream,
        job_id,
    )  # fmt: skip


async def _transcribe(
    request: Request,
    gw: Gateway,
    task: ipb.Task,
    file: UploadFile | None,
    model: str | None,
    language: str,
    prompt: str | None,
    temperature: str | None,
    response_format: str | None,
    granularities: list[str],
    stream: str | None,
    job_id: str | None,
    speakers: Speakers | None = None,
) -> Response:
    fmt = (response_format or "json").strip()
    speakers = speakers or Speakers()
    if fmt not in RESPONSE_FORMATS:
        raise bad_request(
            f"unknown response_format {fmt[:32]!r}; use one of {', '.join(RESPONSE_FORMATS)}", param="response_format"
        )
    wanted = frozenset(g.strip() for g in granularities if g.strip())
    unknown = sorted(wanted - set(GRANULARITIES))
    if unknown:
        raise bad_request(
            f"unknown timestamp_granularities {unknown}; use word and/or segment", param="timestamp_granularities[]"
        )
    if wanted and fmt != "verbose_json":
        raise bad_request(
            "timestamp_granularities need response_format=verbose_json", param="timestamp_granularities[]"
        )
    streaming = validation.boolean(stream, "stream")
    if streaming and fmt not in STREAM_FORMATS:
        raise bad_request(f"stream=true works with response_format json or text, not {fmt}", param="stream")
    sampling = validation.temperature(temperature)
    named_job = validation.job_id(job_id.strip(), "job_id") if job_id and job_id.strip() else ""
    if file is None:
        raise bad_request(
            "file is required: send the audio as the multipart/form-data field 'file'",
            param="file",
            code="missing_file",
        )
    audio = await file.read()
    await file.close()
    if not audio:
        raise bad_request("file is empty; send the bytes of an audio file (wav, mp3, ogg, flac, ...)", param="file")
    options = ipb.TranscribeOptions(
        model_id=_model_id(gw, model),
        language=language,
        task=task,
        word_timestamps="word" in wanted,
        initial_prompt=validation.prompt(prompt),
        job_id=named_job,
        temperature=sampling,  # None leaves the optional field unset
        diarize=speakers.diarize or fmt == "diarized_json",
        known_speakers=[ipb.KnownSpeaker(name=name, audio=clip) for name, clip in speakers.known],
    )
    metadata = call_metadata(authorization(request), model=options.model_id)
    timeout = gw.config.transcribe_timeout_seconds
    if len(audio) <= SINGLE_MESSAGE_AUDIO_BYTES:
        single = ipb.TranscribeRequest(options=options, audio=audio)
        call = gw.backends.inference.Transcribe(single, timeout=timeout, metadata=metadata)
    else:
        call = gw.backends.inference.TranscribeStream(audio_chunks(options, audio), timeout=timeout, metadata=metadata)
    events = Prefetched(gw.backends.stream(INFERENCE, call, not_found=MODEL_NOT_FOUND))
    transcript = Transcript("translate" if task == ipb.TRANSLATE else "transcribe")
    if streaming:
        return await _stream_answer(events, transcript)
    try:
        if not await _unless_disconnected(request, _consume(events, transcript)):
            return Response(status_code=499)  # nginx's "client closed request": for the log and metrics only
    finally:
        await events.aclose()
    headers = {JOB_ID_HEADER: transcript.job_id}
    body = transcript.render(fmt, wanted or frozenset({"segment"}))
    if isinstance(body, dict):
        return JSONResponse(body, headers=headers)
    return PlainTextResponse(body, media_type=MEDIA_TYPES[fmt], headers=headers)


def _model_id(gw: Gateway, model: str | None) -> str:
    name = (model or "").strip()
    if not name or name in gw.config.default_model_aliases:
        return ""  # the inference service's default_model
    return validation.model_id(name, param="model")


async def _consume(events: Prefetched[ipb.TranscribeEvent], transcript: Transcript) -> None:
    async for event in events.items():
        transcript.add(event)


async def _unless_disconnected(request: Request, work: Awaitable[None]) -> bool:
    """Run ``work``; False if the client went away first (the work is cancelled, which
    cancels its gRPC call: the inference service stops an unnamed job at once)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return False
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream_answer(events: Prefetched[ipb.TranscribeEvent], transcript: Transcript) -> Response:
    early: list[ipb.TranscribeEvent] = []
    try:
        async for event in events.items():
            early.append(event)
            if event.WhichOneof("event") in _STARTED:
                break
    except BaseException:
        await events.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            for event in early:
                if (delta := transcript.add(event)) is not None:
                    yield sse({"type": "transcript.text.delta", "delta": delta})
            async for event in events.items():
                if (delta := transcript.add(event)) is not None:
                    yield sse({"type": "transcript.text.delta", "delta": delta})
            yield sse({"type": "transcript.text.done", "text": transcript.text, "usage": transcript.usage()})
        except ApiError as error:
            yield sse(error.body(), event="error")

    job = early[0].job_id if early else ""
    return ClosingStream(
        body(),
        events.aclose,
        media_type=SSE_MEDIA_TYPE,
        headers={JOB_ID_HEADER: job, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# --------------------------------------------------------------------------- models


def openai_model(model: mpb.Model) -> dict[str, Any]:
    return {
        "id": model.model_id,
        "object": "model",
        "created": int(model.updated_at.seconds),
        "owned_by": "voxserve",
        "state": mpb.ModelState.Name(model.state),
        "repo_id": model.repo_id,
        "revision": model.revision,
        "size_bytes": model.size_bytes,
        "description": model.description,
    }


@router.get("/v1/models", summary="The store's Whisper models with their state")
async def list_models(request: Request, gw: Annotated[Gateway, Depends(gateway)]) -> dict[str, Any]:
    reply = await gw.backends.unary(
        STORE, gw.backends.store.ListModels, mpb.ListModelsRequest(kind=mpb.WHISPER), authorization(request)
    )
    return {"object": "list", "data": [openai_model(m) for m in reply.models]}


@router.get("/v1/models/{model}", summary="One Whisper model of the store")
async def retrieve_model(model: str, request: Request, gw: Annotated[Gateway, Depends(gateway)]) -> dict[str, Any]:
    model_id = validation.model_id(model, param="model")
    found = await gw.backends.unary(
        STORE,
        gw.backends.store.GetModel,
        mpb.GetModelRequest(model_id=model_id),
        authorization(request),
        not_found=MODEL_NOT_FOUND,
    )
    if found.kind != mpb.WHISPER:
        kind = mpb.ModelKind.Name(found.kind).lower()
        raise ApiError(
            404, f"{model_id!r} is a {kind} model, not a Whisper model", code="model_not_found", param="model"
        )
    return openai_model(found)
