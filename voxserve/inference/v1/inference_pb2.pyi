import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TRANSCRIBE: _ClassVar[Task]
    TRANSLATE: _ClassVar[Task]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    QUEUED: _ClassVar[Phase]
    PULLING_MODEL: _ClassVar[Phase]
    LOADING_MODEL: _ClassVar[Phase]
    DECODING: _ClassVar[Phase]
    SEPARATING: _ClassVar[Phase]
    VAD: _ClassVar[Phase]
    TRANSCRIBING: _ClassVar[Phase]
    DONE: _ClassVar[Phase]
    DIARIZING: _ClassVar[Phase]

class JobEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_EVENT_TYPE_UNSPECIFIED: _ClassVar[JobEventType]
    JOB_EVENT_ACCEPTED: _ClassVar[JobEventType]
    JOB_EVENT_PROGRESS: _ClassVar[JobEventType]
    JOB_EVENT_INFO: _ClassVar[JobEventType]
    JOB_EVENT_SEGMENT: _ClassVar[JobEventType]
    JOB_EVENT_COMPLETED: _ClassVar[JobEventType]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_QUEUED: _ClassVar[JobState]
    JOB_RUNNING: _ClassVar[JobState]
    JOB_COMPLETED: _ClassVar[JobState]
    JOB_FAILED: _ClassVar[JobState]
    JOB_CANCELLED: _ClassVar[JobState]

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    LINEAR16: _ClassVar[AudioEncoding]
    FLOAT32: _ClassVar[AudioEncoding]

class SpeechEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPEECH_EVENT_UNSPECIFIED: _ClassVar[SpeechEventType]
    SPEECH_STARTED: _ClassVar[SpeechEventType]
    END_OF_UTTERANCE: _ClassVar[SpeechEventType]
TASK_UNSPECIFIED: Task
TRANSCRIBE: Task
TRANSLATE: Task
PHASE_UNSPECIFIED: Phase
QUEUED: Phase
PULLING_MODEL: Phase
LOADING_MODEL: Phase
DECODING: Phase
SEPARATING: Phase
VAD: Phase
TRANSCRIBING: Phase
DONE: Phase
DIARIZING: Phase
JOB_EVENT_TYPE_UNSPECIFIED: JobEventType
JOB_EVENT_ACCEPTED: JobEventType
JOB_EVENT_PROGRESS: JobEventType
JOB_EVENT_INFO: JobEventType
JOB_EVENT_SEGMENT: JobEventType
JOB_EVENT_COMPLETED: JobEventType
JOB_STATE_UNSPECIFIED: JobState
JOB_QUEUED: JobState
JOB_RUNNING: JobState
JOB_COMPLETED: JobState
JOB_FAILED: JobState
JOB_CANCELLED: JobState
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
LINEAR16: AudioEncoding
FLOAT32: AudioEncoding
SPEECH_EVENT_UNSPECIFIED: SpeechEventType
SPEECH_STARTED: SpeechEventType
END_OF_UTTERANCE: SpeechEventType

class TranscribeOptions(_message.Message):
    __slots__ = ("model_id", "language", "task", "beam_size", "vad_filter", "word_timestamps", "initial_prompt", "hotwords", "separate_model_id", "job_id", "fast_first_segment", "temperature", "diarize", "min_speakers", "max_speakers", "diarization_model_id", "known_speakers")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    VAD_FILTER_FIELD_NUMBER: _ClassVar[int]
    WORD_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PROMPT_FIELD_NUMBER: _ClassVar[int]
    HOTWORDS_FIELD_NUMBER: _ClassVar[int]
    SEPARATE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FAST_FIRST_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    DIARIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    DIARIZATION_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    language: str
    task: Task
    beam_size: int
    vad_filter: bool
    word_timestamps: bool
    initial_prompt: str
    hotwords: str
    separate_model_id: str
    job_id: str
    fast_first_segment: bool
    temperature: float
    diarize: bool
    min_speakers: int
    max_speakers: int
    diarization_model_id: str
    known_speakers: _containers.RepeatedCompositeFieldContainer[KnownSpeaker]
    def __init__(self, model_id: _Optional[str] = ..., language: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., beam_size: _Optional[int] = ..., vad_filter: _Optional[bool] = ..., word_timestamps: _Optional[bool] = ..., initial_prompt: _Optional[str] = ..., hotwords: _Optional[str] = ..., separate_model_id: _Optional[str] = ..., job_id: _Optional[str] = ..., fast_first_segment: _Optional[bool] = ..., temperature: _Optional[float] = ..., diarize: _Optional[bool] = ..., min_speakers: _Optional[int] = ..., max_speakers: _Optional[int] = ..., diarization_model_id: _Optional[str] = ..., known_speakers: _Optional[_Iterable[_Union[KnownSpeaker, _Mapping]]] = ...) -> None: ...

class KnownSpeaker(_message.Message):
    __slots__ = ("name", "audio")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    name: str
    audio: bytes
    def __init__(self, name: _Optional[str] = ..., audio: _Optional[bytes] = ...) -> None: ...

class TranscribeRequest(_message.Message):
    __slots__ = ("options", "audio", "model_id", "language", "task", "beam_size", "vad_filter", "word_timestamps", "initial_prompt", "hotwords", "separate_model_id", "job_id")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    VAD_FILTER_FIELD_NUMBER: _ClassVar[int]
    WORD_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PROMPT_FIELD_NUMBER: _ClassVar[int]
    HOTWORDS_FIELD_NUMBER: _ClassVar[int]
    SEPARATE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    options: TranscribeOptions
    audio: bytes
    model_id: str
    language: str
    task: Task
    beam_size: int
    vad_filter: bool
    word_timestamps: bool
    initial_prompt: str
    hotwords: str
    separate_model_id: str
    job_id: str
    def __init__(self, options: _Optional[_Union[TranscribeOptions, _Mapping]] = ..., audio: _Optional[bytes] = ..., model_id: _Optional[str] = ..., language: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., beam_size: _Optional[int] = ..., vad_filter: _Optional[bool] = ..., word_timestamps: _Optional[bool] = ..., initial_prompt: _Optional[str] = ..., hotwords: _Optional[str] = ..., separate_model_id: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class TranscribeChunk(_message.Message):
    __slots__ = ("options", "audio")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    options: TranscribeOptions
    audio: bytes
    def __init__(self, options: _Optional[_Union[TranscribeOptions, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("queue_position", "model_id")
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    queue_position: int
    model_id: str
    def __init__(self, queue_position: _Optional[int] = ..., model_id: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "percent", "message", "bytes_done", "bytes_total")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    percent: float
    message: str
    bytes_done: int
    bytes_total: int
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., percent: _Optional[float] = ..., message: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class Info(_message.Message):
    __slots__ = ("language", "language_probability", "duration")
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    language: str
    language_probability: float
    duration: float
    def __init__(self, language: _Optional[str] = ..., language_probability: _Optional[float] = ..., duration: _Optional[float] = ...) -> None: ...

class Word(_message.Message):
    __slots__ = ("start", "end", "word", "probability", "speaker")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    WORD_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    start: float
    end: float
    word: str
    probability: float
    speaker: str
    def __init__(self, start: _Optional[float] = ..., end: _Optional[float] = ..., word: _Optional[str] = ..., probability: _Optional[float] = ..., speaker: _Optional[str] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("index", "start", "end", "text", "words", "avg_logprob", "no_speech_prob", "speaker")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    AVG_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NO_SPEECH_PROB_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    index: int
    start: float
    end: float
    text: str
    words: _containers.RepeatedCompositeFieldContainer[Word]
    avg_logprob: float
    no_speech_prob: float
    speaker: str
    def __init__(self, index: _Optional[int] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., text: _Optional[str] = ..., words: _Optional[_Iterable[_Union[Word, _Mapping]]] = ..., avg_logprob: _Optional[float] = ..., no_speech_prob: _Optional[float] = ..., speaker: _Optional[str] = ...) -> None: ...

class Completed(_message.Message):
    __slots__ = ("audio_seconds", "processing_seconds", "real_time_factor", "model_load_seconds", "cache_hit", "segments", "text", "speakers")
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REAL_TIME_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    audio_seconds: float
    processing_seconds: float
    real_time_factor: float
    model_load_seconds: float
    cache_hit: bool
    segments: int
    text: str
    speakers: int
    def __init__(self, audio_seconds: _Optional[float] = ..., processing_seconds: _Optional[float] = ..., real_time_factor: _Optional[float] = ..., model_load_seconds: _Optional[float] = ..., cache_hit: _Optional[bool] = ..., segments: _Optional[int] = ..., text: _Optional[str] = ..., speakers: _Optional[int] = ...) -> None: ...

class TranscribeEvent(_message.Message):
    __slots__ = ("job_id", "sequence", "timestamp", "accepted", "progress", "info", "segment", "completed")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sequence: int
    timestamp: _timestamp_pb2.Timestamp
    accepted: Accepted
    progress: Progress
    info: Info
    segment: Segment
    completed: Completed
    def __init__(self, job_id: _Optional[str] = ..., sequence: _Optional[int] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., accepted: _Optional[_Union[Accepted, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., info: _Optional[_Union[Info, _Mapping]] = ..., segment: _Optional[_Union[Segment, _Mapping]] = ..., completed: _Optional[_Union[Completed, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_sequence", "types")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_sequence: int
    types: _containers.RepeatedScalarFieldContainer[JobEventType]
    def __init__(self, job_id: _Optional[str] = ..., after_sequence: _Optional[int] = ..., types: _Optional[_Iterable[_Union[JobEventType, str]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job_id", "state")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_id", "pin")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    pin: bool
    def __init__(self, model_id: _Optional[str] = ..., pin: _Optional[bool] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_id", "force")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    force: bool
    def __init__(self, model_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("model_id", "unloaded", "freed_bytes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    unloaded: bool
    freed_bytes: int
    def __init__(self, model_id: _Optional[str] = ..., unloaded: _Optional[bool] = ..., freed_bytes: _Optional[int] = ...) -> None: ...

class ListLoadedModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadedModel(_message.Message):
    __slots__ = ("model_id", "kind", "device", "compute_type", "memory_bytes", "loaded_at", "last_used", "hits", "in_use", "pinned")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    kind: str
    device: str
    compute_type: str
    memory_bytes: int
    loaded_at: _timestamp_pb2.Timestamp
    last_used: _timestamp_pb2.Timestamp
    hits: int
    in_use: int
    pinned: bool
    def __init__(self, model_id: _Optional[str] = ..., kind: _Optional[str] = ..., device: _Optional[str] = ..., compute_type: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., hits: _Optional[int] = ..., in_use: _Optional[int] = ..., pinned: _Optional[bool] = ...) -> None: ...

class ListLoadedModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[LoadedModel]
    def __init__(self, models: _Optional[_Iterable[_Union[LoadedModel, _Mapping]]] = ...) -> None: ...

class GetCacheStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CacheStats(_message.Message):
    __slots__ = ("hits", "misses", "evictions", "loads", "load_failures", "memory_used_bytes", "memory_budget_bytes", "max_models", "loaded_models", "device")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FAILURES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MODELS_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    evictions: int
    loads: int
    load_failures: int
    memory_used_bytes: int
    memory_budget_bytes: int
    max_models: int
    loaded_models: int
    device: str
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., loads: _Optional[int] = ..., load_failures: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., max_models: _Optional[int] = ..., loaded_models: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class SetCacheLimitsRequest(_message.Message):
    __slots__ = ("max_models", "memory_budget")
    MAX_MODELS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    max_models: int
    memory_budget: str
    def __init__(self, max_models: _Optional[int] = ..., memory_budget: _Optional[str] = ...) -> None: ...

class SetCacheLimitsResponse(_message.Message):
    __slots__ = ("stats", "evicted_model_ids")
    STATS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    stats: CacheStats
    evicted_model_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stats: _Optional[_Union[CacheStats, _Mapping]] = ..., evicted_model_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class StreamingConfig(_message.Message):
    __slots__ = ("options", "encoding", "sample_rate_hertz", "channels", "interim_results", "endpoint_silence_seconds", "max_lag_seconds", "speech_threshold", "speech_pad_seconds")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_SILENCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SPEECH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SPEECH_PAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    options: TranscribeOptions
    encoding: AudioEncoding
    sample_rate_hertz: int
    channels: int
    interim_results: bool
    endpoint_silence_seconds: float
    max_lag_seconds: float
    speech_threshold: float
    speech_pad_seconds: float
    def __init__(self, options: _Optional[_Union[TranscribeOptions, _Mapping]] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hertz: _Optional[int] = ..., channels: _Optional[int] = ..., interim_results: _Optional[bool] = ..., endpoint_silence_seconds: _Optional[float] = ..., max_lag_seconds: _Optional[float] = ..., speech_threshold: _Optional[float] = ..., speech_pad_seconds: _Optional[float] = ...) -> None: ...

class StreamingTranscribeRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: StreamingConfig
    audio: bytes
    def __init__(self, config: _Optional[_Union[StreamingConfig, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class SpeechEvent(_message.Message):
    __slots__ = ("type", "time")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    type: SpeechEventType
    time: float
    def __init__(self, type: _Optional[_Union[SpeechEventType, str]] = ..., time: _Optional[float] = ...) -> None: ...

class StreamingResult(_message.Message):
    __slots__ = ("result_id", "is_final", "stability", "start", "end", "text", "words")
    RESULT_ID_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    STABILITY_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    result_id: str
    is_final: bool
    stability: float
    start: float
    end: float
    text: str
    words: _containers.RepeatedCompositeFieldContainer[Word]
    def __init__(self, result_id: _Optional[str] = ..., is_final: _Optional[bool] = ..., stability: _Optional[float] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., text: _Optional[str] = ..., words: _Optional[_Iterable[_Union[Word, _Mapping]]] = ...) -> None: ...

class StreamingTranscribeResponse(_message.Message):
    __slots__ = ("job_id", "sequence", "timestamp", "audio_received_seconds", "audio_processed_seconds", "accepted", "result", "speech_event", "completed")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    AUDIO_RECEIVED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PROCESSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    SPEECH_EVENT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sequence: int
    timestamp: _timestamp_pb2.Timestamp
    audio_received_seconds: float
    audio_processed_seconds: float
    accepted: Accepted
    result: StreamingResult
    speech_event: SpeechEvent
    completed: Completed
    def __init__(self, job_id: _Optional[str] = ..., sequence: _Optional[int] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., audio_received_seconds: _Optional[float] = ..., audio_processed_seconds: _Optional[float] = ..., accepted: _Optional[_Union[Accepted, _Mapping]] = ..., result: _Optional[_Union[StreamingResult, _Mapping]] = ..., speech_event: _Optional[_Union[SpeechEvent, _Mapping]] = ..., completed: _Optional[_Union[Completed, _Mapping]] = ...) -> None: ...
