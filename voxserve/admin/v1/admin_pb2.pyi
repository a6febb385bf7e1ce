import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SetLogLevelRequest(_message.Message):
    __slots__ = ("logger", "level", "duration_seconds")
    LOGGER_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    logger: str
    level: str
    duration_seconds: float
    def __init__(self, logger: _Optional[str] = ..., level: _Optional[str] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class SetLogLevelResponse(_message.Message):
    __slots__ = ("logger", "level", "previous_level", "reverts_at")
    LOGGER_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_LEVEL_FIELD_NUMBER: _ClassVar[int]
    REVERTS_AT_FIELD_NUMBER: _ClassVar[int]
    logger: str
    level: str
    previous_level: str
    reverts_at: _timestamp_pb2.Timestamp
    def __init__(self, logger: _Optional[str] = ..., level: _Optional[str] = ..., previous_level: _Optional[str] = ..., reverts_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetLogLevelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoggerLevel(_message.Message):
    __slots__ = ("logger", "level", "reverts_at")
    LOGGER_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    REVERTS_AT_FIELD_NUMBER: _ClassVar[int]
    logger: str
    level: str
    reverts_at: _timestamp_pb2.Timestamp
    def __init__(self, logger: _Optional[str] = ..., level: _Optional[str] = ..., reverts_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetLogLevelsResponse(_message.Message):
    __slots__ = ("loggers",)
    LOGGERS_FIELD_NUMBER: _ClassVar[int]
    loggers: _containers.RepeatedCompositeFieldContainer[LoggerLevel]
    def __init__(self, loggers: _Optional[_Iterable[_Union[LoggerLevel, _Mapping]]] = ...) -> None: ...
