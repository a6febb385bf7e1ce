"""Protobuf messages of the Inference service to and from domain objects: the only place that maps them.

The servicer decodes a request here, calls the domain (JobManager, LiveService,
ModelCache) and encodes what comes back here; jobs, live streams and engines never see a
protobuf. Bad values raise InvalidArgument naming the field, mapped to a status code at
the edge like every domain error.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from typing import cast

from inference_service.audio import check_audio_size
from inference_service.engines.whisper import Segment, TranscribeOptions, TranscriptionInfo, checked_temperature
from inference_service.jobs import Job, JobEvent, JobRequest, JobState, Phase, Progress
from inference_service.live.pcm import Encoding
from inference_service.live.service import StreamRequest
from inference_service.live.session import LiveResult, SpeechEvent
from inference_service.live.stream import StreamEvent
from inference_service.model_cache import CacheStats, LimitsChange, LoadedModelInfo
from inference_service.payloads import Accepted, Completed
from inference_service.speakers import DiarizationRequest, KnownSpeaker, diarization_request
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve_common.client_strings import check_job_id, shown
from voxserve_common.errors import InvalidArgument
from voxserve_common.routing import MODEL_HEADER, header_values
from voxserve_common.streams import to_timestamp

TASKS = {pb.TASK_UNSPECIFIED: "transcribe", pb.TRANSCRIBE: "transcribe", pb.TRANSLATE: "translate"}
JOB_STATES = {
    JobState.QUEUED: pb.JOB_QUEUED,
    JobState.RUNNING: pb.JOB_RUNNING,
    JobState.COMPLETED: pb.JOB_COMPLETED,
    JobState.FAILED: pb.JOB_FAILED,
    JobState.CANCELLED: pb.JOB_CANCELLED,
}
PHASE_TO_PB = {phase: cast(pb.Phase, pb.Phase.Value(phase.value)) for phase in Phase}
# WatchJob's types: the payloads each one stands for.
JOB_EVENT_PAYLOADS: dict[int, type] = {
    pb.JOB_EVENT_ACCEPTED: Accepted,
    pb.JOB_EVENT_PROGRESS: Progress,
    pb.JOB_EVENT_INFO: TranscriptionInfo,
    pb.JOB_EVENT_SEGMENT: Segment,
    pb.JOB_EVENT_COMPLETED: Completed,
}
ENCODINGS = {pb.LINEAR16: Encoding.LINEAR16, pb.FLOAT32: Encoding.FLOAT32}
SPEECH_EVENTS = {"SPEECH_STARTED": pb.SPEECH_STARTED, "END_OF_UTTERANCE": pb.END_OF_UTTERANCE}


def required(value: str, field: str) -> str:
    """``value``, or InvalidArgument naming the empty ``field``."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


def check_model_header(metadata: Iterable[tuple[str, str | bytes]] | None, model_id: str) -> None:
    """InvalidArgument when the call's ``x-voxserve-model`` metadata names another model than
    ``model_id``, the one the call uses (the request's, or the default): a proxy hashes on the
    header, so it must never route on a value the service will not use. No header is fine."""
    for value in header_values(metadata, MODEL_HEADER):
        if value != model_id:
            raise InvalidArgument(
                f"the {MODEL_HEADER} header names model {shown(value)} but the request uses {shown(model_id)}; "
                f"send the model the request names (or no {MODEL_HEADER} header)"
            )


# ------------------------------------------------------------------ transcription requests


def options_from_pb(options: pb.TranscribeOptions, default_model: str) -> tuple[str, TranscribeOptions, str, str]:
    """(model_id, engine options, separate_model_id, job_id) from the request options."""
    if options.task not in TASKS:
        raise InvalidArgument(f"unknown task {options.task}; use TRANSCRIBE or TRANSLATE")
    if options.beam_size < 0:
        raise InvalidArgument(f"beam_size must be >= 0 (0 = default 5), got {options.beam_size}")
    # Checked here too so that a bad value fails the call before a job is made.
    temperature = checked_temperature(options.temperature if options.HasField("temperature") else None)
    engine_options = TranscribeOptions(
        language=options.language or None,
        task=TASKS[options.task],
        beam_size=options.beam_size or 5,
        vad_filter=options.vad_filter,
        word_timestamps=options.word_timestamps,
        initial_prompt=options.initial_prompt or None,
        hotwords=options.hotwords or None,
        temperature=temperature,
    )
    return options.model_id or default_model, engine_options, options.separate_model_id, options.job_id


def fast_first_segment_from_pb(options: pb.TranscribeOptions) -> bool | None:
    """The request's fast_first_segment, or None (unset: the service setting decides)."""
    return options.fast_first_segment if options.HasField("fast_first_segment") else None


def merged_options(request: pb.TranscribeRequest) -> pb.TranscribeOptions:
    """The nested options if given, else the flat aliases on the request."""
    if request.HasField("options"):
        return request.options
    return pb.TranscribeOptions(
        model_id=request.model_id,
        language=request.language,
        task=request.task,
        beam_size=request.beam_size,
        vad_filter=request.vad_filter,
        word_timestamps=request.word_timestamps,
        initial_prompt=request.initial_prompt,
        hotwords=request.hotwords,
        separate_model_id=request.separate_model_id,
        job_id=request.job_id,
    )


def diarization_from_pb(options: pb.TranscribeOptions) -> DiarizationRequest | None:
    """The request's diarization (None without ``diarize``); InvalidArgument for bad values."""
    return diarization_request(
        options.diarize,
        options.min_speakers,
        options.max_speakers,
        options.diarization_model_id,
        [KnownSpeaker(k.name, k.audio) for k in options.known_speakers],
    )


def job_request(options: pb.TranscribeOptions, audio: bytes, default_model: str, deadline: float | None) -> JobRequest:
    """The job a Transcribe or TranscribeStream call asks for (InvalidArgument for bad options or no audio)."""
    model_id, engine_options, separate, job_id = options_from_pb(options, default_model)
    diarization = diarization_from_pb(options)
    if not audio:
        raise InvalidArgument("audio is empty; send the bytes of an audio file (wav, mp3, ogg, flac, ...)")
    return JobRequest(
        model_id, audio, engine_options, separate, job_id, deadline, fast_first_segment_from_pb(options), diarization
    )


async def upload_from_chunks(
    chunks: AsyncIterator[pb.TranscribeChunk], max_audio_bytes: int
) -> tuple[pb.TranscribeOptions, bytes]:
    """The options (first chunk) and the audio of a TranscribeStream call, refused as soon as
    the audio grows past ``max_audio_bytes``."""
    options: pb.TranscribeOptions | None = None
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        if options is None:
            if not chunk.HasField("options"):
                raise InvalidArgument(
                    "the first TranscribeChunk must carry options (model_id may be empty for the default)"
                )
            options = chunk.options
        size += len(chunk.audio)
        check_audio_size(size, max_audio_bytes)
        parts.append(chunk.audio)
    if options is None:
        raise InvalidArgument("the stream held no chunks; send options and audio")
    return options, b"".join(parts)


def job_event_payloads(values: Iterable[int]) -> tuple[type, ...]:
    """The payload types WatchJob should send (empty: all); INVALID_ARGUMENT for an undefined type."""
    payloads: list[type] = []
    for value in values:
        if value not in JOB_EVENT_PAYLOADS:
            names = ", ".join(pb.JobEventType.Name(cast(pb.JobEventType, v)) for v in JOB_EVENT_PAYLOADS)
            raise InvalidArgument(f"types: {value} is not a job event type; use {names} (or none for all)")
        payloads.append(JOB_EVENT_PAYLOADS[value])
    return tuple(dict.fromkeys(payloads))


# ------------------------------------------------------------------ transcription events


def job_event_to_pb(job_id: str, event: JobEvent) -> pb.TranscribeEvent:
    message = pb.TranscribeEvent(job_id=job_id, sequence=event.sequence, timestamp=to_timestamp(event.timestamp))
    payload = event.payload
    if isinstance(payload, Segment):
        message.segment.CopyFrom(
            pb.Segment(
                index=payload.index,
                start=payload.start,
                end=payload.end,
                text=payload.text,
                words=[
                    pb.Word(start=w.start, end=w.end, word=w.word, probability=w.probability, speaker=w.speaker)
                    for w in payload.words
                ],
                avg_logprob=payload.avg_logprob,
                no_speech_prob=payload.no_speech_prob,
                speaker=payload.speaker,
            )
        )
    elif isinstance(payload, Progress):
        message.progress.CopyFrom(
            pb.Progress(
                phase=PHASE_TO_PB[payload.phase],
                percent=payload.percent,
                message=payload.message,
                bytes_done=payload.bytes_done,
                bytes_total=payload.bytes_total,
            )
        )
    elif isinstance(payload, TranscriptionInfo):
        message.info.CopyFrom(
            pb.Info(
                language=payload.language, language_probability=payload.language_probability, duration=payload.duration
            )
        )
    elif isinstance(payload, Accepted):
        message.accepted.CopyFrom(accepted_to_pb(payload))
    elif isinstance(payload, Completed):
        message.completed.CopyFrom(completed_to_pb(payload))
    return message


def cancel_response(job: Job) -> pb.CancelJobResponse:
    return pb.CancelJobResponse(job_id=job.job_id, state=JOB_STATES[job.state])


def accepted_to_pb(payload: Accepted) -> pb.Accepted:
    """The ``accepted`` event of a job or a live stream."""
    return pb.Accepted(queue_position=payload.queue_position, model_id=payload.model_id)


def completed_to_pb(payload: Completed) -> pb.Completed:
    """The ``completed`` event of a job or a live stream."""
    return pb.Completed(
        audio_seconds=payload.audio_seconds,
        processing_seconds=payload.processing_seconds,
        real_time_factor=payload.real_time_factor,
        model_load_seconds=payload.model_load_seconds,
        cache_hit=payload.cache_hit,
        segments=payload.segments,
        text=payload.text,
        speakers=payload.speakers,
    )


# ------------------------------------------------------------------ live streams


def stream_request_from_config(config: pb.StreamingConfig, default_model: str) -> StreamRequest:
    """Raises InvalidArgument for an unknown encoding, a rate of 0, bad channels or options."""
    if config.encoding not in ENCODINGS:
        raise InvalidArgument(f"encoding {config.encoding} is not supported; use LINEAR16 (s16le) or FLOAT32 (f32le)")
    if config.sample_rate_hertz <= 0:
        raise InvalidArgument(
            f"sample_rate_hertz must be positive, got {config.sample_rate_hertz}; 16000 needs no resampling"
        )
    if config.channels < 0:
        raise InvalidArgument(f"channels must be >= 0 (0 = mono), got {config.channels}")
    if config.options.separate_model_id:
        raise InvalidArgument("separate_model_id is not available for live streams; leave it empty")
    diarization = config.options
    if (
        diarization.diarize
        or diarization.min_speakers
        or diarization.max_speakers
        or diarization.diarization_model_id
        or diarization.known_speakers
    ):
        raise InvalidArgument(
            "diarize (and min_speakers, max_speakers, diarization_model_id, known_speakers) is not available "
            "for live streams yet; leave them unset, or transcribe the recording instead"
        )
    model_id, options, _, job_id = options_from_pb(config.options, default_model)
    return StreamRequest(
        model_id=model_id,
        options=options,
        encoding=ENCODINGS[config.encoding],
        sample_rate=config.sample_rate_hertz,
        channels=config.channels or 1,
        interim_results=config.interim_results,
        endpoint_silence=config.endpoint_silence_seconds,
        max_lag=config.max_lag_seconds,
        job_id=check_job_id(job_id) if job_id else uuid.uuid4().hex,
        beam_size_given=config.options.beam_size > 0,
        speech_threshold=config.speech_threshold if config.HasField("speech_threshold") else None,
        speech_pad=config.speech_pad_seconds if config.HasField("speech_pad_seconds") else None,
    )


async def stream_request(requests: AsyncIterator[pb.StreamingTranscribeRequest], default_model: str) -> StreamRequest:
    """The stream's config, from its first message (which must carry one)."""
    first = await anext(aiter(requests), None)
    if first is None:
        raise InvalidArgument("the stream held no messages; send a StreamingConfig first, then audio")
    if not first.HasField("config"):
        raise InvalidArgument("the first StreamingTranscribeRequest must carry a config (encoding, sample rate...)")
    return stream_request_from_config(first.config, default_model)


async def stream_audio(requests: AsyncIterator[pb.StreamingTranscribeRequest]) -> AsyncIterator[bytes]:
    """The audio of every message after the config (InvalidArgument for a second config)."""
    async for message in requests:
        if message.HasField("config"):
            raise InvalidArgument("only the first StreamingTranscribeRequest may carry a config; send audio after it")
        yield message.audio


def stream_event_to_pb(event: StreamEvent, job_id: str) -> pb.StreamingTranscribeResponse:
    message = pb.StreamingTranscribeResponse(
        job_id=job_id or uuid.uuid4().hex,
        sequence=event.sequence,
        timestamp=to_timestamp(event.timestamp),
        audio_received_seconds=event.audio_received,
        audio_processed_seconds=event.audio_processed,
    )
    payload = event.payload
    if isinstance(payload, LiveResult):
        message.result.CopyFrom(
            pb.StreamingResult(
                result_id=payload.result_id,
                is_final=payload.is_final,
                stability=payload.stability,
                start=payload.start,
                end=payload.end,
                text=payload.text,
                words=[
                    pb.Word(start=w.start, end=w.end, word=w.word, probability=w.probability) for w in payload.words
                ],
            )
        )
    elif isinstance(payload, SpeechEvent):
        message.speech_event.CopyFrom(pb.SpeechEvent(type=SPEECH_EVENTS[payload.kind], time=payload.time))
    elif isinstance(payload, Accepted):
        message.accepted.CopyFrom(accepted_to_pb(payload))
    elif isinstance(payload, Completed):
        message.completed.CopyFrom(completed_to_pb(payload))
    return message


# ------------------------------------------------------------------ the model cache


def loaded_to_pb(info: LoadedModelInfo) -> pb.LoadedModel:
    return pb.LoadedModel(
        model_id=info.model_id,
        kind=info.kind,
        device=info.device,
        compute_type=info.compute_type,
        memory_bytes=info.memory_bytes,
        loaded_at=to_timestamp(info.loaded_at),
        last_used=to_timestamp(info.last_used),
        hits=info.hits,
        in_use=info.in_use,
        pinned=info.pinned,
    )


def loaded_models_response(models: Iterable[LoadedModelInfo]) -> pb.ListLoadedModelsResponse:
    return pb.ListLoadedModelsResponse(models=[loaded_to_pb(info) for info in models])


def unload_response(info: LoadedModelInfo) -> pb.UnloadModelResponse:
    return pb.UnloadModelResponse(model_id=info.model_id, unloaded=True, freed_bytes=info.memory_bytes)


def cache_stats_to_pb(stats: CacheStats, device: str) -> pb.CacheStats:
    return pb.CacheStats(
        hits=stats.hits,
        misses=stats.misses,
        evictions=stats.evictions,
        loads=stats.loads,
        load_failures=stats.load_failures,
        memory_used_bytes=stats.memory_used_bytes,
        memory_budget_bytes=stats.memory_budget_bytes,
        max_models=stats.max_models,
        loaded_models=stats.loaded_models,
        device=device,
    )


def cache_limits_from_pb(request: pb.SetCacheLimitsRequest) -> tuple[int | None, str | None]:
    """(max_models, memory_budget) to set; None leaves a limit as it is."""
    max_models = request.max_models if request.HasField("max_models") else None
    return max_models, request.memory_budget or None


def set_limits_response(change: LimitsChange, device: str) -> pb.SetCacheLimitsResponse:
    return pb.SetCacheLimitsResponse(stats=cache_stats_to_pb(change.stats, device), evicted_model_ids=change.evicted)
