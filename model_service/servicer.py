"""gRPC adapter of ModelStore: decode requests, call the domain, encode protos."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from model_service.downloader import DownloadJob
from model_service.events import EventType, StoreEvent
from model_service.state import ModelState
from model_service.store import ModelStore, ModelView, PullTicket
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from voxserve_common.errors import InvalidArgument, Unavailable
from voxserve_common.logs import log_context
from voxserve_common.streams import Broadcast, Subscription, to_timestamp

logger = logging.getLogger(__name__)

KIND_TO_PB = {"whisper": pb.WHISPER, "vad": pb.VAD, "demucs": pb.DEMUCS}
PB_TO_KIND = {v: k for k, v in KIND_TO_PB.items()}
STATE_TO_PB = {state: pb.ModelState.Value(state.value) for state in ModelState}
EVENT_TO_PB = {etype: pb.EventType.Value(etype.value) for etype in EventType}
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
        source=view.source,
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
        source=event.source,
        queue_position=event.queue_position,
        message=event.message,
        timestamp=to_timestamp(event.timestamp),
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
        source=view.source,
        queue_position=view.queue_position,
        message=view.error,
        timestamp=to_timestamp(view.updated_at),
        model=model_to_pb(view),
        resync=resync,
    )


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
        self._broadcast: Broadcast | None = None
        # Each event is encoded once however many streams send it.
        self._encoded: collections.OrderedDict[int, pb.ModelEvent] = collections.OrderedDict()

    def _encode(self, event: StoreEvent) -> pb.ModelEvent:
        message = self._encoded.get(event.sequence)
        if message is None:
            message = self._encoded[event.sequence] = event_to_pb(event)
            if len(self._encoded) > 4096:
                self._encoded.popitem(last=False)
        return message

    def _subscribe(self) -> Subscription:
        """A wake-up for one stream; the store's bus has one listener for all of them."""
        if self._broadcast is None:
            self._broadcast = Broadcast(asyncio.get_running_loop())
            self.store.bus.add_listener(self._broadcast)
        return self._broadcast.subscribe()

    @property
    def open_streams(self) -> int:
        """PullModel and WatchModels streams currently waiting for events."""
        return len(self._broadcast.subscriptions) if self._broadcast is not None else 0

    def shut_down(self) -> None:
        """Flag the shutdown and wake every open stream, so each ends now with UNAVAILABLE
        (and its resume point) instead of sleeping until the grace period cancels it."""
        self.shutting_down.set()
        if self._broadcast is not None:
            self._broadcast.wake_all()

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        kind = PB_TO_KIND.get(request.kind) if request.kind else None
        views = await asyncio.to_thread(self.store.list_models, kind)
        return pb.ListModelsResponse(models=[model_to_pb(v) for v in views])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        return model_to_pb(self.store.get_model(_require_id(request.model_id)))

    async def CancelDownload(self, request: pb.CancelDownloadRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        with log_context(model_id=request.model_id):
            return model_to_pb(await asyncio.to_thread(self.store.cancel, _require_id(request.model_id)))

    async def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        with log_context(model_id=request.model_id):
            return model_to_pb(await asyncio.to_thread(self.store.delete, _require_id(request.model_id)))

    async def VerifyModel(
        self, request: pb.VerifyModelRequest, context: grpc.aio.ServicerContext
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

    async def ImportModel(self, request: pb.ImportModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        with log_context(model_id=request.model_id):
            view = await asyncio.to_thread(self.store.import_model, _require_id(request.model_id), request.source_dir)
        return model_to_pb(view)

    async def PullModel(
        self, request: pb.PullModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelEvent]:
        model_id = _require_id(request.model_id)
        wakeup = self._subscribe()
        self.store.metrics.active_watchers.labels("PullModel").inc()
        job: DownloadJob | None = None
        try:
            with log_context(model_id=model_id):
                ticket: PullTicket = await asyncio.to_thread(self.store.pull, model_id, request.revision or None)
            if ticket.job is None:
                view = ticket.view or self.store.get_model(model_id)
                yield pb.ModelEvent(
                    sequence=self.store.bus.sequence,
                    model_id=model_id,
                    type=pb.STATE_CHANGED,
                    state=pb.READY,
                    bytes_done=view.size_bytes,
                    bytes_total=view.size_bytes,
                    files_done=len(view.files),
                    files_total=len(view.files),
                    source=view.source,
                    message="already downloaded and intact",
                    timestamp=to_timestamp(view.updated_at),
                    model=model_to_pb(view),
                )
                return
            job = ticket.job
            job.add_done_callback(wakeup.broadcast)
            last = ticket.start_sequence
            if ticket.joined:
                view = self.store.get_model(model_id)
                yield snapshot_event(view, self.store.bus.sequence, resync=False)
            while True:
                events = self.store.bus.events_after(last)
                if events is None:  # fell out of history: report where the model is now
                    view = self.store.get_model(model_id)
                    last = self.store.bus.sequence
                    yield snapshot_event(view, last, resync=True)
                    events = []
                for event in events:
                    last = event.sequence
                    if event.model_id == model_id:
                        yield self._encode(event)
                if job.done_event.is_set():
                    trailing = self.store.bus.events_after(last) or []
                    for event in trailing:
                        if event.model_id == model_id:
                            yield self._encode(event)
                    if job.error is not None:
                        raise job.error
                    final = self.store.get_model(model_id)
                    if final.state != ModelState.READY:
                        raise Unavailable(f"{model_id} ended {final.state.value}: {final.error}")
                    return
                if self.shutting_down.is_set():
                    raise Unavailable(
                        "model store is shutting down; the download continues after restart when pulled again"
                    )
                await wakeup.wait(self.heartbeat_seconds)
        except asyncio.CancelledError:
            logger.info("pull stream closed by client; the download continues", extra={"model_id": model_id})
            raise
        finally:
            if job is not None:
                job.remove_done_callback(wakeup.broadcast)
            wakeup.close()
            self.store.metrics.active_watchers.labels("PullModel").dec()

    async def WatchModels(
        self, request: pb.WatchModelsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelEvent]:
        wanted = set(request.model_ids)
        for model_id in wanted:
            self.store.catalog.get(model_id)
        wakeup = self._subscribe()
        self.store.metrics.active_watchers.labels("WatchModels").inc()
        bus = self.store.bus
        try:
            last = request.after_sequence
            backlog = bus.events_after(last) if last else None
            if backlog is None:
                async for item in self._snapshot(wanted, resync=bool(last)):
                    if isinstance(item, int):
                        last = item
                    else:
                        yield item
            else:
                for event in backlog:
                    last = event.sequence
                    if not wanted or event.model_id in wanted:
                        yield self._encode(event)
            while not self.shutting_down.is_set():
                woke = await wakeup.wait(self.heartbeat_seconds)
                if self.shutting_down.is_set():
                    break
                if not woke:
                    yield pb.ModelEvent(sequence=bus.sequence, type=pb.HEARTBEAT, timestamp=_timestamp_now())
                    continue
                events = bus.events_after(last)
                if events is None:
                    async for item in self._snapshot(wanted, resync=True):
                        if isinstance(item, int):
                            last = item
                        else:
                            yield item
                    continue
                for event in events:
                    last = event.sequence
                    if not wanted or event.model_id in wanted:
                        yield self._encode(event)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"model store is shutting down; reconnect with after_sequence={last}"
            )
        finally:
            wakeup.close()
            self.store.metrics.active_watchers.labels("WatchModels").dec()

    async def _snapshot(self, wanted: set[str], resync: bool) -> AsyncIterator[pb.ModelEvent | int]:
        views, sequence = await asyncio.to_thread(self.store.snapshot, wanted or None)
        for view in views:
            yield snapshot_event(view, sequence, resync)
        yield pb.ModelEvent(sequence=sequence, type=pb.SNAPSHOT_END, resync=resync, timestamp=_timestamp_now())
        yield sequence

    async def FetchModelFiles(
        self, request: pb.FetchModelFilesRequest, context: grpc.aio.ServicerContext
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


def _timestamp_now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp
