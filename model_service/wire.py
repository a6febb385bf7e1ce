"""Every conversion between the ModelStore protos and the store's domain objects, both ways."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Protocol, cast

from google.protobuf.timestamp_pb2 import Timestamp

from model_service.events import EventType, StoreEvent
from model_service.state import ModelState
from model_service.store.download.sources import BreakerState, SourceHealth
from model_service.store.reader import FileChunkData
from model_service.store.reconcile import VerifyResult
from model_service.store.registry import ModelView
from model_service.urls import display_url
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve_common.errors import InvalidArgument
from voxserve_common.streams import to_timestamp

KIND_TO_PB = {"whisper": pb.WHISPER, "vad": pb.VAD, "demucs": pb.DEMUCS, "diarization": pb.DIARIZATION}
PB_TO_KIND = {v: k for k, v in KIND_TO_PB.items()}
STATE_TO_PB = {state: cast(pb.ModelState, pb.ModelState.Value(state.value)) for state in ModelState}
EVENT_TO_PB = {etype: cast(pb.EventType, pb.EventType.Value(etype.value)) for etype in EventType}
PB_TO_EVENT = {int(value): etype for etype, value in EVENT_TO_PB.items()}
BREAKER_TO_PB = {state: cast(pb.BreakerState, pb.BreakerState.Value(state.value)) for state in BreakerState}

# ----------------------------------------------------------------- requests


class _NamesAModel(Protocol):
    @property
    def model_id(self) -> str: ...


def model_id(request: _NamesAModel) -> str:
    """The request's model id; InvalidArgument when it is empty."""
    if not request.model_id:
        raise InvalidArgument("model_id is required; ListModels shows the catalog")
    return request.model_id


def kind(request: pb.ListModelsRequest) -> str | None:
    """The kind ListModels filters on; None for every kind."""
    return PB_TO_KIND.get(request.kind) if request.kind else None


def event_types(values: Iterable[int]) -> frozenset[EventType]:
    """The requested event types; INVALID_ARGUMENT for a value the API does not define."""
    types = set()
    for value in values:
        if value not in PB_TO_EVENT:
            raise InvalidArgument(
                f"types: {value} is not an event type; use {', '.join(e.value for e in EventType)} (or none for all)"
            )
        types.add(PB_TO_EVENT[value])
    return frozenset(types)


def chunk_size(request: pb.FetchModelFilesRequest) -> int:
    """The requested chunk size (0: the server's default); InvalidArgument when negative."""
    if request.chunk_size < 0:
        raise InvalidArgument("chunk_size must be >= 0 (0 = server default)")
    return request.chunk_size


# ----------------------------------------------------------------- responses


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


def models_to_pb(views: Iterable[ModelView]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[model_to_pb(v) for v in views])


def verify_to_pb(result: VerifyResult) -> pb.VerifyModelResponse:
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


def sources_to_pb(healths: Iterable[SourceHealth]) -> pb.ListSourcesResponse:
    return pb.ListSourcesResponse(sources=[source_to_pb(h) for h in healths])


def chunk_to_pb(chunk: FileChunkData) -> pb.FileChunk:
    return pb.FileChunk(
        path=chunk.path,
        offset=chunk.offset,
        data=chunk.data,
        file_size=chunk.file_size,
        sha256=chunk.sha256,
        revision=chunk.revision,
        file_index=chunk.file_index,
        files_total=chunk.files_total,
    )


# ----------------------------------------------------------------- events


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


class EventEncoder:
    """``event_to_pb`` with a cache: each event is encoded once however many streams send it."""

    SIZE = 4096

    def __init__(self) -> None:
        self._encoded: collections.OrderedDict[int, pb.ModelEvent] = collections.OrderedDict()

    def __call__(self, event: StoreEvent) -> pb.ModelEvent:
        message = self._encoded.get(event.sequence)
        if message is None:
            message = self._encoded[event.sequence] = event_to_pb(event)
            if len(self._encoded) > self.SIZE:
                self._encoded.popitem(last=False)
        return message


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


def snapshot_end(sequence: int, resync: bool) -> pb.ModelEvent:
    return pb.ModelEvent(sequence=sequence, type=pb.SNAPSHOT_END, resync=resync, timestamp=_timestamp_now())


def heartbeat(sequence: int) -> pb.ModelEvent:
    return pb.ModelEvent(sequence=sequence, type=pb.HEARTBEAT, timestamp=_timestamp_now())


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


def _timestamp_now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp
