"""gRPC adapter of ModelStore: decode requests, call the domain, encode protos."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from model_service.downloader import DownloadJob
from model_service.events import EventType, StoreEvent
from model_service.hub import BreakerState, display_url
from model_service.state import ModelState
from model_service.store import ModelStore, ModelView, PullTicket, SourceHealth
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from voxserve_common.errors import InvalidArgument, Unavailable
from voxserve_common.eventlog import End, Heartbeat, Resync
from voxserve_common.logs import log_context
from voxserve_common.streams import to_timestamp

logger = logging.getLogger(__name__)

KIND_TO_PB = {"whisper": pb.WHISPER, "vad": pb.VAD, "demucs": pb.DEMUCS}
PB_TO_KIND = {v: k for k, v in KIND_TO_PB.items()}
STATE_TO_PB = {state: cast(pb.ModelState, pb.ModelState.Value(state.value)) for state in ModelState}
EVENT_TO_PB = {etype: cast(pb.EventType, pb.EventType.Value(etype.value)) for etype in EventType}
PB_TO_EVENT = {int(value): etype for etype, value in EVENT_TO_PB.items()}
BREAKER_TO_PB = {state: cast(pb.BreakerState, pb.BreakerState.Value(state.value)) for state in BreakerState}
TERMINAL_OK = {ModelState.READY}


def model_to_pb(view: ModelView) -> pb.Model:
    return pb.Model(
        model_id=view.model_id,
        kind=KIND_TO_PB.get(view.kind, pb.MODEL_KIND_UNSPECIFIED),
        repo_id=view.repo_id,
        revision=view.revision,
        requested_revision=view.requested_revision,
        state=STATE_TO_PB[view.state],
        size_bytes=view.size_bytes,
        local_path=view.local_path,
        files=[
            pb.ModelFile(path=f.path, size=f.size, sha256=f.sha256, required=f.required, present=f.present)
            for f in view.files
        ],
        source=display_url(view.source),
        error_message=view.error,
        updated_at=to_timestamp(view.updated_at),
        bytes_on_disk=view.bytes_on_disk,
        queue_position=view.queue_position,
        description=view.description,
    )


def event_to_pb(event: StoreEvent) -> pb.ModelEvent:
    return pb.ModelEvent(
        sequence=event.sequence,
        model_id=event.model_id,
        type=EVENT_TO_PB[event.type],
        state=STATE_TO_PB[event.state],
        bytes_done=event.bytes_done,
        bytes_total=event.bytes_total,
        bytes_per_second=event.bytes_per_second,
        eta_seconds=event.eta_seconds,
        files_done=event.files_done,
        files_total=event.files_total,
        current_file=event.current_file,
        source=display_url(event.source),
        queue_position=event.queue_position,
        message=event.message,
        timestamp=to_timestamp(event.timestamp),
        verify_bytes_done=event.verify_bytes_done,
        verify_bytes_total=event.verify_bytes_total,
    )


def snapshot_event(view: ModelView, sequence: int, resync: bool) -> pb.ModelEvent:
    return pb.ModelEvent(
        sequence=sequence,
        model_id=view.model_id,
        type=pb.SNAPSHOT,
        state=STATE_TO_PB[view.state],
        bytes_total=view.size_bytes,
        bytes_done=view.bytes_on_disk,
        files_total=len(view.files),
        files_done=sum(f.present for f in view.files),
        source=display_url(view.source),
        queue_position=view.queue_position,
        message=view.error,
        timestamp=to_timestamp(view.updated_at),
        model=model_to_pb(view),
        resync=resync,
    )


def already_ready_event(view: ModelView, sequence: int) -> pb.ModelEvent:
    """The one event of a PullModel whose model is READY and intact already."""
    return pb.ModelEvent(
        sequence=sequence,
        model_id=view.model_id,
        type=pb.STATE_CHANGED,
        state=pb.READY,
        bytes_done=view.size_bytes,
        bytes_total=view.size_bytes,
        files_done=len(view.files),
        files_total=len(view.files),
        source=display_url(view.source),
        message="already downloaded and intact",
        timestamp=to_timestamp(view.updated_at),
        model=model_to_pb(view),
    )


def source_to_pb(health: SourceHealth) -> pb.Source:
    message = pb.Source(
        name=health.name,
        url=display_url(health.url),
        last_failure_reason=health.last_failure_reason,
        consecutive_failures=health.consecutive_failures,
        breaker_state=BREAKER_TO_PB[health.state],
        retry_after_seconds=health.retry_after_seconds,
    )
    if health.last_success_at is not None:
        message.last_success_at.CopyFrom(to_timestamp(health.last_success_at))
    if health.last_failure_at is not None:
        message.last_failure_at.CopyFrom(to_timestamp(health.last_failure_at))
    return message


def _require_id(model_id: str) -> str:
    if not model_id:
        raise InvalidArgument("model_id is required; ListModels shows the catalog")
    return model_id


class ModelStoreServicer(pb_grpc.ModelStoreServicer):
    """Thin adapter; every rule lives in ModelStore."""

    def __init__(self, store: ModelStore, heartbeat_seconds: float, shutting_down: asyncio.Event | None = None) -> None:
        self.store = store
        self.heartbeat_seconds = heartbeat_seconds
        self.shutting_down = shutting_down or asyncio.Event()
        # Each event is encoded once however many streams send it.
        self._encoded: collections.OrderedDict[int, pb.ModelEvent] = collections.OrderedDict()

    def _encode(self, event: StoreEvent) -> pb.ModelEvent:
        message = self._encoded.get(event.sequence)
        if message is None:
            message = self._encoded[event.sequence] = event_to_pb(event)
            if len(self._encoded) > 4096:
                self._encoded.popitem(last=False)
        return message

    @property
    def open_streams(self) -> int:
        """PullModel and WatchModels streams currently following the store's events."""
        return self.store.bus.follower_count

    def shut_down(self) -> None:
        """Flag the shutdown: every open stream ends now with UNAVAILABLE (and its resume
        point) instead of sleeping until the grace period cancels it."""
        self.shutting_down.set()

    async def ListModels(
        self,
        request: pb.ListModelsRequest,
        context: grpc.aio.ServicerContext[pb.ListModelsRequest, pb.ListModelsResponse],
    ) -> pb.ListModelsResponse:
        kind = PB_TO_KIND.get(request.kind) if request.kind else None
        views = await asyncio.to_thread(self.store.list_models, kind)
        return pb.ListModelsResponse(models=[model_to_pb(v) for v in views])

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext[pb.GetModelRequest, pb.Model]
    ) -> pb.Model:
        return model_to_pb(self.store.get_model(_require_id(request.model_id)))

    async def CancelDownload(
        self, request: pb.CancelDownloadRequest, context: grpc.aio.ServicerContext[pb.CancelDownloadRequest, pb.Model]
    ) -> pb.Model:
        with log_context(model_id=request.model_id):
            return model_to_pb(await asyncio.to_thread(self.store.cancel, _require_id(request.model_id)))

    async def PauseDownload(
        self, request: pb.PauseDownloadRequest, context: grpc.aio.ServicerContext[pb.PauseDownloadRequest, pb.Model]
    ) -> pb.Model:
        with log_context(model_id=request.model_id):
            return model_to_pb(await asyncio.to_thread(self.store.pause, _require_id(request.model_id)))

    async def ResumeDownload(
        self, request: pb.ResumeDownloadRequest, context: grpc.aio.ServicerContext[pb.ResumeDownloadRequest, pb.Model]
    ) -> pb.Model:
        with log_context(model_id=request.model_id):
            return model_to_pb(await asyncio.to_thread(self.store.resume, _require_id(request.model_id)))

    async def ListSources(
        self,
        request: pb.ListSourcesRequest,
        context: grpc.aio.ServicerContext[pb.ListSourcesRequest, pb.ListSourcesResponse],
    ) -> pb.ListSourcesResponse:
        return pb.ListSourcesResponse(sources=[source_to_pb(h) for h in self.store.list_sources()])

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext[pb.DeleteModelRequest, pb.Model]
    ) -> pb.Model:
        with log_context(model_id=request.model_id):
            return model_to_pb(await asyncio.to_thread(self.store.delete, _require_id(request.model_id)))

    async def VerifyModel(
        self,
        request: pb.VerifyModelRequest,
        context: grpc.aio.ServicerContext[pb.VerifyModelRequest, pb.VerifyModelResponse],
    ) -> pb.VerifyModelResponse:
        with log_context(model_id=request.model_id):
            result = await asyncio.to_thread(self.store.verify, _require_id(request.model_id))
        return pb.VerifyModelResponse(
            model=model_to_pb(result.model),
            ok=result.ok,
            seconds=result.seconds,
            files=[
                pb.FileCheck(
                    path=c.path,
                    ok=c.ok,
                    problem=c.problem,
                    expected_size=c.expected_size,
                    actual_size=c.actual_size,
                    expected_sha256=c.expected_sha256,
                    actual_sha256=c.actual_sha256,
                )
                for c in result.files
            ],
        )

    async def ImportModel(
        self, request: pb.ImportModelRequest, context: grpc.aio.ServicerContext[pb.ImportModelRequest, pb.Model]
    ) -> pb.Model:
        with log_context(model_id=request.model_id):
            view = await asyncio.to_thread(self.store.import_model, _require_id(request.model_id), request.source_dir)
        return model_to_pb(view)

    async def PullModel(
        self, request: pb.PullModelRequest, context: grpc.aio.ServicerContext[pb.PullModelRequest, pb.ModelEvent]
    ) -> AsyncIterator[pb.ModelEvent]:
        model_id = _require_id(request.model_id)
        self.store.metrics.active_watchers.labels("PullModel").inc()
        job: DownloadJob | None = None
        job_done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_job_done() -> None:
            loop.call_soon_threadsafe(job_done.set)

        try:
            with log_context(model_id=model_id):
                ticket: PullTicket = await asyncio.to_thread(
                    self.store.pull, model_id, request.revision or None, request.source or None
                )
            if ticket.job is None:
                yield already_ready_event(ticket.view or self.store.get_model(model_id), self.store.bus.sequence)
                return
            job = ticket.job
            job.add_done_callback(on_job_done)
            if ticket.joined:
                yield snapshot_event(self.store.get_model(model_id), self.store.bus.sequence, resync=False)
            events = self.store.bus.follow(
                ticket.start_sequence, model_ids=(model_id,), stop=(job_done, self.shutting_down)
            )
            async with contextlib.aclosing(events):
                async for item in events:
                    if isinstance(item, StoreEvent):
                        yield self._encode(item)
                    elif isinstance(item, Resync):  # fell out of history: report where the model is now
                        views, sequence = await asyncio.to_thread(self.store.snapshot, {model_id})
                        yield snapshot_event(views[0], sequence, resync=True)
                        item.resume_after(sequence)
                    elif isinstance(item, End):
                        break
            if job.done_event.is_set():
                if job.error is not None:
                    raise job.error
                final = self.store.get_model(model_id)
                if final.state != ModelState.READY:
                    raise Unavailable(f"{model_id} ended {final.state.value}: {final.error}")
                return
            raise Unavailable("model store is shutting down; the download continues after restart when pulled again")
        except asyncio.CancelledError:
            logger.info("pull stream closed by client; the download continues", extra={"model_id": model_id})
            raise
        finally:
            if job is not None:
                job.remove_done_callback(on_job_done)
            self.store.metrics.active_watchers.labels("PullModel").dec()

    async def WatchModels(
        self, request: pb.WatchModelsRequest, context: grpc.aio.ServicerContext[pb.WatchModelsRequest, pb.ModelEvent]
    ) -> AsyncIterator[pb.ModelEvent]:
        wanted = set(request.model_ids)
        for model_id in wanted:
            self.store.catalog.get(model_id)
        types = _event_types(request.types)
        self.store.metrics.active_watchers.labels("WatchModels").inc()
        try:
            after = request.after_sequence
            if not after and (not types or EventType.SNAPSHOT in types):
                snapshot, after = await self._snapshot(wanted, resync=False)
                for message in snapshot:
                    yield message
            elif not after:
                after = self.store.bus.sequence
            events = self.store.bus.follow(
                after, model_ids=wanted, types=types, heartbeat=self.heartbeat_seconds, stop=(self.shutting_down,)
            )
            async with contextlib.aclosing(events):
                async for item in events:
                    if isinstance(item, StoreEvent):
                        yield self._encode(item)
                    elif isinstance(item, Resync):
                        snapshot, sequence = await self._snapshot(wanted, resync=True)
                        for message in snapshot:
                            yield message
                        item.resume_after(sequence)
                    elif isinstance(item, Heartbeat):
                        if not types or EventType.HEARTBEAT in types:
                            yield pb.ModelEvent(sequence=item.sequence, type=pb.HEARTBEAT, timestamp=_timestamp_now())
                    else:
                        await context.abort(
                            grpc.StatusCode.UNAVAILABLE,
                            f"model store is shutting down; reconnect with after_sequence={item.sequence}",
                        )
        finally:
            self.store.metrics.active_watchers.labels("WatchModels").dec()

    async def _snapshot(self, wanted: set[str], resync: bool) -> tuple[list[pb.ModelEvent], int]:
        """SNAPSHOT events of the wanted models and SNAPSHOT_END, and the sequence they show."""
        views, sequence = await asyncio.to_thread(self.store.snapshot, wanted or None)
        messages = [snapshot_event(view, sequence, resync) for view in views]
        messages.append(
            pb.ModelEvent(sequence=sequence, type=pb.SNAPSHOT_END, resync=resync, timestamp=_timestamp_now())
        )
        return messages, sequence

    async def FetchModelFiles(
        self,
        request: pb.FetchModelFilesRequest,
        context: grpc.aio.ServicerContext[pb.FetchModelFilesRequest, pb.FileChunk],
    ) -> AsyncIterator[pb.FileChunk]:
        model_id = _require_id(request.model_id)
        if request.chunk_size < 0:
            raise InvalidArgument("chunk_size must be >= 0 (0 = server default)")
        chunks = self.store.iter_file_chunks(model_id, request.chunk_size, list(request.paths) or None)
        sentinel = object()
        next_chunk: Callable[[], object] = lambda: next(chunks, sentinel)  # noqa: E731
        # Each read runs in a worker thread; if the client cancels mid-read, the generator
        # is still executing there, so it is closed (releasing the model) when that read ends.
        pending: asyncio.Future[object] | None = None
        try:
            while True:
                pending = asyncio.ensure_future(asyncio.to_thread(next_chunk))
                chunk = await asyncio.shield(pending)
                pending = None
                if chunk is sentinel:
                    return
                yield pb.FileChunk(
                    path=chunk.path,  # type: ignore[attr-defined]
                    offset=chunk.offset,  # type: ignore[attr-defined]
                    data=chunk.data,  # type: ignore[attr-defined]
                    file_size=chunk.file_size,  # type: ignore[attr-defined]
                    sha256=chunk.sha256,  # type: ignore[attr-defined]
                    revision=chunk.revision,  # type: ignore[attr-defined]
                    file_index=chunk.file_index,  # type: ignore[attr-defined]
                    files_total=chunk.files_total,  # type: ignore[attr-defined]
                )
        finally:
            if pending is not None and not pending.done():
                pending.add_done_callback(lambda _: chunks.close())
            else:
                chunks.close()


def _event_types(values: Iterable[int]) -> frozenset[EventType]:
    """The requested event types; INVALID_ARGUMENT for a value the API does not define."""
    types = set()
    for value in values:
        if value not in PB_TO_EVENT:
            raise InvalidArgument(
                f"types: {value} is not an event type; use {', '.join(e.value for e in EventType)} (or none for all)"
            )
        types.add(PB_TO_EVENT[value])
    return frozenset(types)


def _timestamp_now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp
