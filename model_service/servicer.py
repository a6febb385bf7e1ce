"""gRPC adapter of ModelStore: each RPC goes to the store's part that does the job; wire.py
decodes the request and encodes the result."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from model_service import wire
from model_service.events import EventType, StoreEvent
from model_service.state import ModelState
from model_service.store import ModelStore
from model_service.store.download.queue import DownloadJob
from model_service.store.download.service import DownloadTicket
from model_service.store.reader import FileChunkData
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from voxserve_common.errors import Unavailable
from voxserve_common.eventlog import End, Heartbeat, Resync
from voxserve_common.logs import log_context

logger = logging.getLogger(__name__)


class ModelStoreServicer(pb_grpc.ModelStoreServicer):
    """Thin adapter; every rule lives in the store."""

    def __init__(self, store: ModelStore, heartbeat_seconds: float, shutting_down: asyncio.Event | None = None) -> None:
        self.store = store
        self.heartbeat_seconds = heartbeat_seconds
        self.shutting_down = shutting_down or asyncio.Event()
        self._encode = wire.EventEncoder()

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
        return wire.models_to_pb(await asyncio.to_thread(self.store.list_models, wire.kind(request)))

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext[pb.GetModelRequest, pb.Model]
    ) -> pb.Model:
        return wire.model_to_pb(self.store.registry.view(wire.model_id(request)))

    async def CancelDownload(
        self, request: pb.CancelDownloadRequest, context: grpc.aio.ServicerContext[pb.CancelDownloadRequest, pb.Model]
    ) -> pb.Model:
        with log_context(model_id=request.model_id):
            return wire.model_to_pb(await asyncio.to_thread(self.store.downloads.cancel, wire.model_id(request)))

    async def PauseDownload(
        self, request: pb.PauseDownloadRequest, context: grpc.aio.ServicerContext[pb.PauseDownloadRequest, pb.Model]
    ) -> pb.Model:
        with log_context(model_id=request.model_id):
            return wire.model_to_pb(await asyncio.to_thread(self.store.downloads.pause, wire.model_id(request)))

    async def ResumeDownload(
        self, request: pb.ResumeDownloadRequest, context: grpc.aio.ServicerContext[pb.ResumeDownloadRequest, pb.Model]
    ) -> pb.Model:
        with log_context(model_id=request.model_id):
            return wire.model_to_pb(await asyncio.to_thread(self.store.downloads.resume, wire.model_id(request)))

    async def ListSources(
        self,
        request: pb.ListSourcesRequest,
        context: grpc.aio.ServicerContext[pb.ListSourcesRequest, pb.ListSourcesResponse],
    ) -> pb.ListSourcesResponse:
        return wire.sources_to_pb(self.store.downloads.source_health())

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext[pb.DeleteModelRequest, pb.Model]
    ) -> pb.Model:
        with log_context(model_id=request.model_id):
            return wire.model_to_pb(await asyncio.to_thread(self.store.delete, wire.model_id(request)))

    async def VerifyModel(
        self,
        request: pb.VerifyModelRequest,
        context: grpc.aio.ServicerContext[pb.VerifyModelRequest, pb.VerifyModelResponse],
    ) -> pb.VerifyModelResponse:
        with log_context(model_id=request.model_id):
            result = await asyncio.to_thread(self.store.reconciler.verify, wire.model_id(request))
        return wire.verify_to_pb(result)

    async def ImportModel(
        self, request: pb.ImportModelRequest, context: grpc.aio.ServicerContext[pb.ImportModelRequest, pb.Model]
    ) -> pb.Model:
        with log_context(model_id=request.model_id):
            view = await asyncio.to_thread(self.store.importer.import_model, wire.model_id(request), request.source_dir)
        return wire.model_to_pb(view)

    async def PullModel(
        self, request: pb.PullModelRequest, context: grpc.aio.ServicerContext[pb.PullModelRequest, pb.ModelEvent]
    ) -> AsyncIterator[pb.ModelEvent]:
        model_id = wire.model_id(request)
        self.store.metrics.active_watchers.labels("PullModel").inc()
        job: DownloadJob | None = None
        job_done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_job_done() -> None:
            loop.call_soon_threadsafe(job_done.set)

        try:
            with log_context(model_id=model_id):
                ticket: DownloadTicket = await asyncio.to_thread(
                    self.store.downloads.request, model_id, request.revision or None, request.source or None
                )
            if ticket.job is None:
                view = ticket.view or self.store.registry.view(model_id)
                yield wire.already_ready_event(view, self.store.bus.sequence)
                return
            job = ticket.job
            job.add_done_callback(on_job_done)
            if ticket.joined:
                yield wire.snapshot_event(self.store.registry.view(model_id), self.store.bus.sequence, resync=False)
            events = self.store.bus.follow(
                ticket.start_sequence, model_ids=(model_id,), stop=(job_done, self.shutting_down)
            )
            async with contextlib.aclosing(events):
                async for item in events:
                    if isinstance(item, StoreEvent):
                        yield self._encode(item)
                    elif isinstance(item, Resync):  # fell out of history: report where the model is now
                        views, sequence = await asyncio.to_thread(self.store.registry.snapshot, {model_id})
                        yield wire.snapshot_event(views[0], sequence, resync=True)
                        item.resume_after(sequence)
                    elif isinstance(item, End):
                        break
            if job.done_event.is_set():
                if job.error is not None:
                    raise job.error
                final = self.store.registry.view(model_id)
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
        types = wire.event_types(request.types)
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
                            yield wire.heartbeat(item.sequence)
                    else:
                        await context.abort(
                            grpc.StatusCode.UNAVAILABLE,
                            f"model store is shutting down; reconnect with after_sequence={item.sequence}",
                        )
        finally:
            self.store.metrics.active_watchers.labels("WatchModels").dec()

    async def _snapshot(self, wanted: set[str], resync: bool) -> tuple[list[pb.ModelEvent], int]:
        """SNAPSHOT events of the wanted models and SNAPSHOT_END, and the sequence they show."""
        views, sequence = await asyncio.to_thread(self.store.registry.snapshot, wanted or None)
        messages = [wire.snapshot_event(view, sequence, resync) for view in views]
        messages.append(wire.snapshot_end(sequence, resync))
        return messages, sequence

    async def FetchModelFiles(
        self,
        request: pb.FetchModelFilesRequest,
        context: grpc.aio.ServicerContext[pb.FetchModelFilesRequest, pb.FileChunk],
    ) -> AsyncIterator[pb.FileChunk]:
        model_id = wire.model_id(request)
        chunks = self.store.reader.iter_file_chunks(model_id, wire.chunk_size(request), list(request.paths) or None)
        next_chunk: Callable[[], FileChunkData | None] = lambda: next(chunks, None)  # noqa: E731
        # Each read runs in a worker thread; if the client cancels mid-read, the generator
        # is still executing there, so it is closed (releasing the model) when that read ends.
        pending: asyncio.Future[FileChunkData | None] | None = None
        try:
            while True:
                pending = asyncio.ensure_future(asyncio.to_thread(next_chunk))
                chunk = await asyncio.shield(pending)
                pending = None
                if chunk is None:
                    return
                yield wire.chunk_to_pb(chunk)
        finally:
            if pending is not None and not pending.done():
                pending.add_done_callback(lambda _: chunks.close())
            else:
                chunks.close()
