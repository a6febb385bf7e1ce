"""The model cache's vocabulary: specs, progress, limits, snapshots, entries and typed leases."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Generic, Protocol

from typing_extensions import TypeVar

from inference_service.errors import WrongModelKind
from inference_service.memory import is_cuda
from voxserve_common.errors import InvalidArgument
from voxserve_common.kinds import ModelKind


@dataclass(frozen=True)
class LoadProgress:
    """One step of getting a model ready.

    The resolver reports what it likes (stage "pulling" with bytes while the store
    downloads); the cache adds "loading" before and "loaded" after building the model.
    """

    model_id: str
    stage: str
    bytes_done: int = 0
    bytes_total: int = 0
    message: str = ""


ProgressCallback = Callable[[LoadProgress], None]


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to load a model: its kind and files (size_bytes: all its files on disk).

    A kind's name ("whisper") is accepted and converted to its ModelKind.
    """

    model_id: str
    kind: ModelKind
    path: Path
    size_bytes: int

    def __post_init__(self) -> None:
        kind = ModelKind.parse(self.kind)
        if kind is None:
            raise InvalidArgument(
                f"model {self.model_id!r} has kind {self.kind!r}; expected one of {', '.join(ModelKind)}"
            )
        object.__setattr__(self, "kind", kind)
        if self.size_bytes < 0:
            raise InvalidArgument(f"model {self.model_id!r} has a negative size ({self.size_bytes} bytes)")


class LoadedModel(Protocol):
    """What the cache needs of a loaded model; engines add their own methods.

    ``kind`` is a class attribute so that ``ModelCache.acquire_as(model_id, WhisperEngine)``
    knows the kind to ask for from the engine class alone.
    """

    kind: ClassVar[ModelKind]

    @property
    def device(self) -> str: ...

    @property
    def compute_type(self) -> str: ...

    def close(self) -> None: ...


@dataclass
class CacheConfig:
    """Limits of the model cache.

    memory_budget_bytes None means 80% of the device's memory (RAM on CPU, VRAM on CUDA).
    The watchdog evicts idle models when what the process has added since start-up
    (RSS on CPU, device memory in use on CUDA) passes watchdog_threshold x the budget, or
    when the whole device is fuller than watchdog_threshold of its memory.
    Models named in pinned are pinned whenever they are loaded. warmup runs one short decode
    of silence through each Whisper model as part of its load (inference_service/warmup.py).
    idle_ttl_seconds > 0 unloads an idle, unpinned model nobody used for that long (0: never).
    """

    max_models: int = 3
    memory_budget_bytes: int | None = None
    device: str = "cpu"
    watchdog_interval_seconds: float = 5.0
    watchdog_threshold: float = 0.9
    pinned: tuple[str, ...] = ()
    warmup: bool = True
    idle_ttl_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.max_models < 1:
            raise InvalidArgument(f"max_models must be at least 1, not {self.max_models}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise InvalidArgument(f"memory budget must be positive, not {self.memory_budget_bytes} bytes")
        if self.device != "cpu" and not is_cuda(self.device):
            raise InvalidArgument(f"device {self.device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
        if self.watchdog_interval_seconds <= 0:
            raise InvalidArgument(f"watchdog interval must be positive, not {self.watchdog_interval_seconds}")
        if not 0 < self.watchdog_threshold <= 1:
            raise InvalidArgument(f"watchdog threshold must be in (0, 1], not {self.watchdog_threshold}")
        if self.idle_ttl_seconds < 0:
            raise InvalidArgument(f"idle TTL must be >= 0 seconds (0 = never), not {self.idle_ttl_seconds}")
        self.pinned = tuple(self.pinned)


@dataclass(frozen=True)
class LoadedModelInfo:
    """A snapshot of one cache entry (loaded_at and last_used are wall-clock epoch seconds)."""

    model_id: str
    kind: ModelKind
    device: str
    compute_type: str
    memory_bytes: int
    loaded_at: float
    last_used: float
    hits: int
    in_use: int
    pinned: bool


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was created, and the memory figures now."""

    hits: int
    misses: int
    evictions: int
    loads: int
    load_failures: int
    memory_used_bytes: int
    memory_budget_bytes: int
    max_models: int
    evictions_by_reason: Mapping[str, int] = field(default_factory=dict)
    loaded_models: int = 0


@dataclass(eq=False)
class CacheEntry:
    """One loaded model and its bookkeeping: CacheState's record, changed only under its lock
    (policy.py reads entries to decide; nothing else holds one)."""

    spec: ModelSpec
    model: LoadedModel | None
    kind: ModelKind
    device: str
    compute_type: str
    memory_bytes: int
    loaded_at: float
    last_used: float
    pinned: bool
    hits: int = 0
    refcount: int = 0
    detached: bool = False  # unloaded with force while in use: closed at the last release

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    def info(self, own_leases: int = 0) -> LoadedModelInfo:
        """A snapshot; own_leases are the caller's leases, not counted as in use."""
        return LoadedModelInfo(
            model_id=self.model_id,
            kind=self.kind,
            device=self.device,
            compute_type=self.compute_type,
            memory_bytes=self.memory_bytes,
            loaded_at=self.loaded_at,
            last_used=self.last_used,
            hits=self.hits,
            in_use=self.refcount - own_leases,
            pinned=self.pinned,
        )


M_co = TypeVar("M_co", bound=LoadedModel, default=LoadedModel, covariant=True)


class Lease(Generic[M_co]):
    """A model checked out of the cache: while it is held the model is neither evicted nor closed.

    Use it as a context manager; ``model`` must not be used after the lease is released.
    ``Lease[WhisperEngine]`` (from ``ModelCache.acquire_as``) types ``model`` as the engine.
    Only the cache makes leases; ``release`` is the cache's, which knows each lease it handed
    out and ignores one it has taken back already.
    """

    def __init__(
        self,
        model: M_co,
        *,
        model_id: str,
        kind: ModelKind,
        cache_hit: bool,
        load_seconds: float,
        release: Callable[[Lease[LoadedModel]], None],
    ) -> None:
        self._model = model
        self.model_id = model_id
        self.kind = kind
        self.cache_hit = cache_hit
        self.load_seconds = load_seconds
        self._release_to = release
        self._released = False  # for repr only: the cache keeps the count

    @property
    def model(self) -> M_co:
        return self._model

    def release(self) -> None:
        """Give the model back; releasing twice is harmless."""
        self._release_to(self)
        self._released = True

    def __enter__(self) -> Lease[M_co]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"Lease({self.model_id!r}, {state}, cache_hit={self.cache_hit})"


@dataclass(frozen=True)
class LimitsChange:
    """What SetCacheLimits (or a SIGHUP) did.

    ``evicted``: idle, unpinned models evicted to meet the new limits, in eviction order.
    ``held_over``: models in use or pinned that keep the cache over the new limits; the limits
    are in force anyway (new loads respect them) and each of these models is evicted when it
    becomes idle while the cache is still over (pinned ones stay until unloaded or unpinned).
    """

    stats: CacheStats
    evicted: tuple[str, ...]
    held_over: tuple[str, ...]

    @property
    def over_limits(self) -> bool:
        return bool(self.held_over)


# The model_id label of misses and failed loads of ids the store does not know: never a valid
# catalog id, so made-up ids share one metric series instead of creating one each.
UNKNOWN_MODEL_LABEL = "(unknown)"


def kind_accepted(expected_kind: str | None, kind: ModelKind) -> bool:
    """Whether a caller that expects ``expected_kind`` (None: any) can use a model of ``kind``."""
    return expected_kind is None or expected_kind == kind


def wrong_kind(model_id: str, kind: ModelKind, expected_kind: str | None) -> WrongModelKind:
    return WrongModelKind(f"model {model_id!r} is a {kind} model, but this request needs a {expected_kind} model")
