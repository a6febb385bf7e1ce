"""gRPC adapter of the inference service: decode requests, call jobs/cache, encode events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import grpc

from inference_service.audio import check_audio_size
from inference_service.engines.whisper import Segment, TranscribeOptions, TranscriptionInfo, checked_temperature
from inference_service.jobs import (
    ENDED,
    Job,
    JobEvent,
    JobManager,
    JobRequest,
    JobState,
    Phase,
    Progress,
)
from inference_service.live.adapter import accepted_to_pb, completed_to_pb, stream_responses
from inference_service.live.service import LiveService
from inference_service.model_cache import CacheStats, LoadedModelInfo, ModelCache
from inference_service.payloads import Accepted, Completed
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.inference.v1 import inference_pb2_grpc as pb_grpc
from voxserve_common.errors import InvalidArgument, Unavailable
from voxserve_common.eventlog import End, Resync
from voxserve_common.logs import log_context
from voxserve_common.streams import to_timestamp

logger = logging.getLogger(__name__)

TASKS = {pb.TASK_UNSPECIFIED: "transcribe", pb.TRANSCRIBE: "transcribe", pb.TRANSLATE: "translate"}
JOB_STATES = {
    JobState.QUEUED: pb.JOB_QUEUED,
    JobState.RUNNING: pb.JOB_RUNNING,
    JobState.COMPLETED: pb.JOB_COMPLETED,
    JobState.FAILED: pb.JOB_FAILED,
    JobState.CANCELLED: pb.JOB_CANCELLED,
}


PHASE_TO_PB = {phase: cast(pb.Phase, pb.Phase.Value(phase.value)) for phase in Phase}


def event_to_pb(job_id: str, event: JobEvent) -> pb.TranscribeEvent:
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
                    pb.Word(start=w.start, end=w.end, word=w.word, probability=w.probability) for w in payload.words
                ],
                avg_logprob=payload.avg_logprob,
                no_speech_prob=payload.no_speech_prob,
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


class InferenceServicer(pb_grpc.InferenceServicer):
    """Thin adapter over JobManager and ModelCache."""

    def __init__(
        self,
        jobs: JobManager,
        cache: ModelCache,
        default_model: str,
        max_audio_bytes: int,
        shutting_down: asyncio.Event | None = None,
        live: LiveService | None = None,
    ) -> None:
        self.live = live
        self.jobs = jobs
        self.cache = cache
        self.default_model = default_model
        self.max_audio_bytes = max_audio_bytes
        self.shutting_down = shutting_down or asyncio.Event()

    # ------------------------------------------------------------- transcription

    async def Transcribe(
        self, request: pb.TranscribeRequest, context: grpc.aio.ServicerContext[pb.TranscribeRequest, pb.TranscribeEvent]
    ) -> AsyncIterator[pb.TranscribeEvent]:
        async for event in self._run_job(merged_options(request), request.audio, context):
            yield event

    async def TranscribeStream(
        self,
        request_iterator: AsyncIterator[pb.TranscribeChunk],
        context: grpc.aio.ServicerContext[pb.TranscribeChunk, pb.TranscribeEvent],
    ) -> AsyncIterator[pb.TranscribeEvent]:
        options: pb.TranscribeOptions | None = None
        parts: list[bytes] = []
        size = 0
        async for chunk in request_iterator:
            if options is None:
                if not chunk.HasField("options"):
                    raise InvalidArgument(
                        "the first TranscribeChunk must carry options (model_id may be empty for the default)"
                    )
                options = chunk.options
            size += len(chunk.audio)
            check_audio_size(size, self.max_audio_bytes)
            parts.append(chunk.audio)
        if options is None:
            raise InvalidArgument("the stream held no chunks; send options and audio")
        async for event in self._run_job(options, b"".join(parts), context):
            yield event

    async def _run_job(
        self, options: pb.TranscribeOptions, audio: bytes, context: grpc.aio.ServicerContext[Any, pb.TranscribeEvent]
    ) -> AsyncIterator[pb.TranscribeEvent]:
        model_id, engine_options, separate, job_id = options_from_pb(options, self.default_model)
        if not audio:
            raise InvalidArgument("audio is empty; send the bytes of an audio file (wav, mp3, ogg, flac, ...)")
        check_audio_size(len(audio), self.max_audio_bytes)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        request = JobRequest(
            model_id, audio, engine_options, separate, job_id, deadline, fast_first_segment_from_pb(options)
        )
        job, existing = self.jobs.submit(request)
        with log_context(job_id=job.job_id, model_id=model_id):
            logger.info("job attached" if existing else "job accepted", extra={"audio_bytes": len(audio)})
            completed = False
            try:
                async for event in self._follow(job, 0):
                    yield event
                completed = True
            finally:
                if not completed and not job.client_named and job.state not in ENDED:
                    # The caller went away and gave no job_id to come back with: stop the work.
                    job.cancel_event.set()
                    logger.info("client left; job cancelled")

    async def _follow(self, job: Job, after: int, stop_at_shutdown: bool = True) -> AsyncIterator[pb.TranscribeEvent]:
        """Every event of ``job`` after ``after``, live, until it ends; then its status.

        At shutdown a job without a client job_id cannot be re-attached to after the
        restart: it is cancelled, and the stream ends with its outcome once it stopped.
        """
        stop = (self.shutting_down,) if stop_at_shutdown and not job.client_named else ()
        items = job.follow(after, stop=stop)
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, JobEvent):
                    yield event_to_pb(job.job_id, item)
                elif isinstance(item, Resync):
                    if item.from_the_future:
                        raise InvalidArgument(
                            f"after_sequence {item.after} is past the last event ({item.sequence}) of job {job.job_id}"
                        )
                    raise Unavailable(
                        f"events after {item.after} of job {job.job_id} are no longer kept; the history holds the "
                        f"last {self.jobs.limits.history_events}"
                    )
                elif isinstance(item, End):
                    if not item.closed:
                        job.cancel_event.set()
                        async for message in self._follow(job, item.sequence, stop_at_shutdown=False):
                            yield message
                    elif job.error is not None:
                        raise job.error

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext[pb.WatchJobRequest, pb.TranscribeEvent]
    ) -> AsyncIterator[pb.TranscribeEvent]:
        if not request.job_id:
            raise InvalidArgument("job_id is required")
        wanted = _job_event_kinds(request.types)
        job = self.jobs.get(request.job_id)
        async for event in self._follow(job, request.after_sequence):
            if not wanted or event.WhichOneof("event") in wanted:
                yield event

    async def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext[pb.CancelJobRequest, pb.CancelJobResponse]
    ) -> pb.CancelJobResponse:
        if not request.job_id:
            raise InvalidArgument("job_id is required")
        job = self.jobs.cancel(request.job_id)
        await asyncio.to_thread(job.done_event.wait, 5.0)
        return pb.CancelJobResponse(job_id=job.job_id, state=JOB_STATES[job.state])

    async def StreamingTranscribe(
        self,
        request_iterator: AsyncIterator[pb.StreamingTranscribeRequest],
        context: grpc.aio.ServicerContext[pb.StreamingTranscribeRequest, pb.StreamingTranscribeResponse],
    ) -> AsyncIterator[pb.StreamingTranscribeResponse]:
        if self.live is None:
            raise Unavailable("live transcription is not enabled on this instance")
        responses = stream_responses(self.live, request_iterator, lambda o: options_from_pb(o, self.default_model))
        async with contextlib.aclosing(responses):
            async for response in responses:
                yield response

    # ------------------------------------------------------------- cache

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext[pb.LoadModelRequest, pb.LoadedModel]
    ) -> pb.LoadedModel:
        if not request.model_id:
            raise InvalidArgument("model_id is required")
        info = self.cache.touch_loaded(request.model_id, request.pin)
        if info is None:
            with log_context(model_id=request.model_id):
                info = await asyncio.to_thread(self.cache.load_model, request.model_id, request.pin)
        return loaded_to_pb(info)

    async def UnloadModel(
        self,
        request: pb.UnloadModelRequest,
        context: grpc.aio.ServicerContext[pb.UnloadModelRequest, pb.UnloadModelResponse],
    ) -> pb.UnloadModelResponse:
        if not request.model_id:
            raise InvalidArgument("model_id is required")
        with log_context(model_id=request.model_id):
            info = await asyncio.to_thread(self.cache.unload, request.model_id, request.force)
        return pb.UnloadModelResponse(model_id=info.model_id, unloaded=True, freed_bytes=info.memory_bytes)

    async def ListLoadedModels(
        self,
        request: pb.ListLoadedModelsRequest,
        context: grpc.aio.ServicerContext[pb.ListLoadedModelsRequest, pb.ListLoadedModelsResponse],
    ) -> pb.ListLoadedModelsResponse:
        return pb.ListLoadedModelsResponse(models=[loaded_to_pb(m) for m in self.cache.loaded()])

    async def GetCacheStats(
        self,
        request: pb.GetCacheStatsRequest,
        context: grpc.aio.ServicerContext[pb.GetCacheStatsRequest, pb.CacheStats],
    ) -> pb.CacheStats:
        return cache_stats_to_pb(self.cache.stats(), self.cache.config.device)

    async def SetCacheLimits(
        self,
        request: pb.SetCacheLimitsRequest,
        context: grpc.aio.ServicerContext[pb.SetCacheLimitsRequest, pb.SetCacheLimitsResponse],
    ) -> pb.SetCacheLimitsResponse:
        max_models = request.max_models if request.HasField("max_models") else None
        change = await asyncio.to_thread(self.cache.set_limits, max_models, request.memory_budget or None)
        return pb.SetCacheLimitsResponse(
            stats=cache_stats_to_pb(change.stats, self.cache.config.device), evicted_model_ids=change.evicted
        )


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


JOB_EVENT_KINDS: dict[int, str] = {
    pb.JOB_EVENT_ACCEPTED: "accepted",
    pb.JOB_EVENT_PROGRESS: "progress",
    pb.JOB_EVENT_INFO: "info",
    pb.JOB_EVENT_SEGMENT: "segment",
    pb.JOB_EVENT_COMPLETED: "completed",
}


def _job_event_kinds(values: Iterable[int]) -> frozenset[str]:
    """The oneof names WatchJob should send; INVALID_ARGUMENT for an undefined type."""
    kinds = set()
    for value in values:
        if value not in JOB_EVENT_KINDS:
            names = ", ".join(pb.JobEventType.Name(cast(pb.JobEventType, v)) for v in JOB_EVENT_KINDS)
            raise InvalidArgument(f"types: {value} is not a job event type; use {names} (or none for all)")
        kinds.add(JOB_EVENT_KINDS[value])
    return frozenset(kinds)
