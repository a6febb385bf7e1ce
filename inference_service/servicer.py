"""gRPC adapter of the inference service: decode a request (wire), call jobs/live/cache, encode (wire)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from inference_service import wire
from inference_service.audio import check_audio_size
from inference_service.jobs import ENDED, Job, JobEvent, JobManager
from inference_service.live.service import LiveService
from inference_service.model_cache import ModelCache
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.inference.v1 import inference_pb2_grpc as pb_grpc
from voxserve_common.errors import InvalidArgument, Unavailable
from voxserve_common.eventlog import End, Resync
from voxserve_common.logs import log_context

logger = logging.getLogger(__name__)


class InferenceServicer(pb_grpc.InferenceServicer):
    """Thin adapter over JobManager, LiveService and ModelCache: every message is mapped in ``wire``."""

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
        async for event in self._run_job(wire.merged_options(request), request.audio, context):
            yield event

    async def TranscribeStream(
        self,
        request_iterator: AsyncIterator[pb.TranscribeChunk],
        context: grpc.aio.ServicerContext[pb.TranscribeChunk, pb.TranscribeEvent],
    ) -> AsyncIterator[pb.TranscribeEvent]:
        options, audio = await wire.upload_from_chunks(request_iterator, self.max_audio_bytes)
        async for event in self._run_job(options, audio, context):
            yield event

    async def _run_job(
        self, options: pb.TranscribeOptions, audio: bytes, context: grpc.aio.ServicerContext[Any, pb.TranscribeEvent]
    ) -> AsyncIterator[pb.TranscribeEvent]:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        request = wire.job_request(options, audio, self.default_model, deadline)
        wire.check_model_header(context.invocation_metadata(), request.model_id)
        check_audio_size(len(audio), self.max_audio_bytes)
        job, existing = self.jobs.submit(request)
        with log_context(job_id=job.job_id, model_id=request.model_id):
            logger.info("job attached" if existing else "job accepted", extra={"audio_bytes": len(audio)})
            completed = False
            try:
                async for event in self._follow(job, 0):
                    yield wire.job_event_to_pb(job.job_id, event)
                completed = True
            finally:
                if not completed and not job.client_named and job.state not in ENDED:
                    # The caller went away and gave no job_id to come back with: stop the work.
                    job.cancel()
                    logger.info("client left; job cancelled")

    async def _follow(self, job: Job, after: int, stop_at_shutdown: bool = True) -> AsyncIterator[JobEvent]:
        """Every event of ``job`` after ``after``, live, until it ends; then its status.

        At shutdown a job without a client job_id cannot be re-attached to after the
        restart: it is cancelled, and the stream ends with its outcome once it stopped.
        """
        stop = (self.shutting_down,) if stop_at_shutdown and not job.client_named else ()
        items = job.follow(after, stop=stop)
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, JobEvent):
                    yield item
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
                        job.cancel()
                        async for event in self._follow(job, item.sequence, stop_at_shutdown=False):
                            yield event
                    elif (error := job.error_for_caller()) is not None:
                        raise error

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext[pb.WatchJobRequest, pb.TranscribeEvent]
    ) -> AsyncIterator[pb.TranscribeEvent]:
        job_id = wire.required(request.job_id, "job_id")
        wanted = wire.job_event_payloads(request.types)
        job = self.jobs.get(job_id)
        async for event in self._follow(job, request.after_sequence):
            if not wanted or isinstance(event.payload, wanted):
                yield wire.job_event_to_pb(job.job_id, event)

    async def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext[pb.CancelJobRequest, pb.CancelJobResponse]
    ) -> pb.CancelJobResponse:
        job = self.jobs.cancel(wire.required(request.job_id, "job_id"))
        await asyncio.to_thread(job.done_event.wait, 5.0)
        return wire.cancel_response(job)

    async def StreamingTranscribe(
        self,
        request_iterator: AsyncIterator[pb.StreamingTranscribeRequest],
        context: grpc.aio.ServicerContext[pb.StreamingTranscribeRequest, pb.StreamingTranscribeResponse],
    ) -> AsyncIterator[pb.StreamingTranscribeResponse]:
        if self.live is None:
            raise Unavailable("live transcription is not enabled on this instance")
        stream = await wire.stream_request(request_iterator, self.default_model)
        wire.check_model_header(context.invocation_metadata(), stream.model_id)
        events = self.live.run(stream, wire.stream_audio(request_iterator))
        async with contextlib.aclosing(events):
            async for event in events:
                yield wire.stream_event_to_pb(event, stream.job_id)

    # ------------------------------------------------------------- cache

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext[pb.LoadModelRequest, pb.LoadedModel]
    ) -> pb.LoadedModel:
        model_id = wire.required(request.model_id, "model_id")
        wire.check_model_header(context.invocation_metadata(), model_id)
        info = self.cache.touch_loaded(model_id, request.pin)
        if info is None:
            with log_context(model_id=model_id):
                info = await asyncio.to_thread(self.cache.load_model, model_id, request.pin)
        return wire.loaded_to_pb(info)

    async def UnloadModel(
        self,
        request: pb.UnloadModelRequest,
        context: grpc.aio.ServicerContext[pb.UnloadModelRequest, pb.UnloadModelResponse],
    ) -> pb.UnloadModelResponse:
        model_id = wire.required(request.model_id, "model_id")
        wire.check_model_header(context.invocation_metadata(), model_id)
        with log_context(model_id=model_id):
            info = await asyncio.to_thread(self.cache.unload, model_id, request.force)
        return wire.unload_response(info)

    async def ListLoadedModels(
        self,
        request: pb.ListLoadedModelsRequest,
        context: grpc.aio.ServicerContext[pb.ListLoadedModelsRequest, pb.ListLoadedModelsResponse],
    ) -> pb.ListLoadedModelsResponse:
        return wire.loaded_models_response(self.cache.loaded())

    async def GetCacheStats(
        self,
        request: pb.GetCacheStatsRequest,
        context: grpc.aio.ServicerContext[pb.GetCacheStatsRequest, pb.CacheStats],
    ) -> pb.CacheStats:
        return wire.cache_stats_to_pb(self.cache.stats(), self.cache.config.device)

    async def SetCacheLimits(
        self,
        request: pb.SetCacheLimitsRequest,
        context: grpc.aio.ServicerContext[pb.SetCacheLimitsRequest, pb.SetCacheLimitsResponse],
    ) -> pb.SetCacheLimitsResponse:
        max_models, memory_budget = wire.cache_limits_from_pb(request)
        change = await asyncio.to_thread(self.cache.set_limits, max_models, memory_budget)
        return wire.set_limits_response(change, self.cache.config.device)
