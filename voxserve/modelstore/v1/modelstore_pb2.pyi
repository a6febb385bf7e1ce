import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    WHISPER: _ClassVar[ModelKind]
    VAD: _ClassVar[ModelKind]
    DEMUCS: _ClassVar[ModelKind]
    DIARIZATION: _ClassVar[ModelKind]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    NOT_DOWNLOADED: _ClassVar[ModelState]
    WAITING: _ClassVar[ModelState]
    DOWNLOADING: _ClassVar[ModelState]
    VERIFYING: _ClassVar[ModelState]
    READY: _ClassVar[ModelState]
    INCOMPLETE: _ClassVar[ModelState]
    ERROR: _ClassVar[ModelState]
    PAUSED: _ClassVar[ModelState]

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    CLOSED: _ClassVar[BreakerState]
    OPEN: _ClassVar[BreakerState]
    HALF_OPEN: _ClassVar[BreakerState]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    SNAPSHOT: _ClassVar[EventType]
    SNAPSHOT_END: _ClassVar[EventType]
    STATE_CHANGED: _ClassVar[EventType]
    PROGRESS: _ClassVar[EventType]
    HEARTBEAT: _ClassVar[EventType]
MODEL_KIND_UNSPECIFIED: ModelKind
WHISPER: ModelKind
VAD: ModelKind
DEMUCS: ModelKind
DIARIZATION: ModelKind
MODEL_STATE_UNSPECIFIED: ModelState
NOT_DOWNLOADED: ModelState
WAITING: ModelState
DOWNLOADING: ModelState
VERIFYING: ModelState
READY: ModelState
INCOMPLETE: ModelState
ERROR: ModelState
PAUSED: ModelState
BREAKER_STATE_UNSPECIFIED: BreakerState
CLOSED: BreakerState
OPEN: BreakerState
HALF_OPEN: BreakerState
EVENT_TYPE_UNSPECIFIED: EventType
SNAPSHOT: EventType
SNAPSHOT_END: EventType
STATE_CHANGED: EventType
PROGRESS: EventType
HEARTBEAT: EventType

class ModelFile(_message.Message):
    __slots__ = ("path", "size", "sha256", "required", "present")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    required: bool
    present: bool
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., required: _Optional[bool] = ..., present: _Optional[bool] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("model_id", "kind", "repo_id", "revision", "state", "size_bytes", "local_path", "files", "source", "error_message", "requested_revision", "updated_at", "bytes_on_disk", "queue_position", "description")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REPO_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PATH_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    BYTES_ON_DISK_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    kind: ModelKind
    repo_id: str
    revision: str
    state: ModelState
    size_bytes: int
    local_path: str
    files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    source: str
    error_message: str
    requested_revision: str
    updated_at: _timestamp_pb2.Timestamp
    bytes_on_disk: int
    queue_position: int
    description: str
    def __init__(self, model_id: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., repo_id: _Optional[str] = ..., revision: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., size_bytes: _Optional[int] = ..., local_path: _Optional[str] = ..., files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ..., source: _Optional[str] = ..., error_message: _Optional[str] = ..., requested_revision: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., bytes_on_disk: _Optional[int] = ..., queue_position: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("kind",)
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: ModelKind
    def __init__(self, kind: _Optional[_Union[ModelKind, str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class PullModelRequest(_message.Message):
    __slots__ = ("model_id", "revision", "source")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    source: str
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class CancelDownloadRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class PauseDownloadRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ResumeDownloadRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ListSourcesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Source(_message.Message):
    __slots__ = ("name", "url", "last_success_at", "last_failure_at", "last_failure_reason", "consecutive_failures", "breaker_state", "retry_after_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    LAST_SUCCESS_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    BREAKER_STATE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    last_success_at: _timestamp_pb2.Timestamp
    last_failure_at: _timestamp_pb2.Timestamp
    last_failure_reason: str
    consecutive_failures: int
    breaker_state: BreakerState
    retry_after_seconds: float
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., last_success_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_failure_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_failure_reason: _Optional[str] = ..., consecutive_failures: _Optional[int] = ..., breaker_state: _Optional[_Union[BreakerState, str]] = ..., retry_after_seconds: _Optional[float] = ...) -> None: ...

class ListSourcesResponse(_message.Message):
    __slots__ = ("sources",)
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    def __init__(self, sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class VerifyModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class FileCheck(_message.Message):
    __slots__ = ("path", "ok", "problem", "expected_size", "actual_size", "expected_sha256", "actual_sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHA256_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    ok: bool
    problem: str
    expected_size: int
    actual_size: int
    expected_sha256: str
    actual_sha256: str
    def __init__(self, path: _Optional[str] = ..., ok: _Optional[bool] = ..., problem: _Optional[str] = ..., expected_size: _Optional[int] = ..., actual_size: _Optional[int] = ..., expected_sha256: _Optional[str] = ..., actual_sha256: _Optional[str] = ...) -> None: ...

class VerifyModelResponse(_message.Message):
    __slots__ = ("model", "ok", "files", "seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: Model
    ok: bool
    files: _containers.RepeatedCompositeFieldContainer[FileCheck]
    seconds: float
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ..., ok: _Optional[bool] = ..., files: _Optional[_Iterable[_Union[FileCheck, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class ImportModelRequest(_message.Message):
    __slots__ = ("model_id", "source_dir")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DIR_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    source_dir: str
    def __init__(self, model_id: _Optional[str] = ..., source_dir: _Optional[str] = ...) -> None: ...

class WatchModelsRequest(_message.Message):
    __slots__ = ("after_sequence", "model_ids", "types")
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    after_sequence: int
    model_ids: _containers.RepeatedScalarFieldContainer[str]
    types: _containers.RepeatedScalarFieldContainer[EventType]
    def __init__(self, after_sequence: _Optional[int] = ..., model_ids: _Optional[_Iterable[str]] = ..., types: _Optional[_Iterable[_Union[EventType, str]]] = ...) -> None: ...

class ModelEvent(_message.Message):
    __slots__ = ("sequence", "model_id", "type", "state", "bytes_done", "bytes_total", "bytes_per_second", "eta_seconds", "files_done", "files_total", "current_file", "source", "queue_position", "message", "timestamp", "model", "resync", "verify_bytes_done", "verify_bytes_total")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FILES_DONE_FIELD_NUMBER: _ClassVar[int]
    FILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FILE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    VERIFY_BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    VERIFY_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    model_id: str
    type: EventType
    state: ModelState
    bytes_done: int
    bytes_total: int
    bytes_per_second: float
    eta_seconds: float
    files_done: int
    files_total: int
    current_file: str
    source: str
    queue_position: int
    message: str
    timestamp: _timestamp_pb2.Timestamp
    model: Model
    resync: bool
    verify_bytes_done: int
    verify_bytes_total: int
    def __init__(self, sequence: _Optional[int] = ..., model_id: _Optional[str] = ..., type: _Optional[_Union[EventType, str]] = ..., state: _Optional[_Union[ModelState, str]] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., bytes_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., files_done: _Optional[int] = ..., files_total: _Optional[int] = ..., current_file: _Optional[str] = ..., source: _Optional[str] = ..., queue_position: _Optional[int] = ..., message: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[_Union[Model, _Mapping]] = ..., resync: _Optional[bool] = ..., verify_bytes_done: _Optional[int] = ..., verify_bytes_total: _Optional[int] = ...) -> None: ...

class FetchModelFilesRequest(_message.Message):
    __slots__ = ("model_id", "chunk_size", "paths")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    chunk_size: int
    paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., chunk_size: _Optional[int] = ..., paths: _Optional[_Iterable[str]] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("path", "offset", "data", "file_size", "sha256", "revision", "file_index", "files_total")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FILE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    data: bytes
    file_size: int
    sha256: str
    revision: str
    file_index: int
    files_total: int
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., file_size: _Optional[int] = ..., sha256: _Optional[str] = ..., revision: _Optional[str] = ..., file_index: _Optional[int] = ..., files_total: _Optional[int] = ...) -> None: ...
