"""Picks the device and compute type for a model, so no engine assumes a GPU."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy  # noqa: F401 - loads the BLAS library, which a limit reaches only once loaded
import threadpoolctl

from voxserve_common.errors import InvalidArgument

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda")
COMPUTE_TYPES = (
    "default",
    "auto",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)
DEFAULT_COMPUTE_TYPE = {"cpu": "int8", "cuda": "float16"}


@dataclass(frozen=True)
class DeviceChoice:
    """Where a model runs (``cpu`` or ``cuda``) and at which precision (a CTranslate2 compute type)."""

    device: str
    compute_type: str


def cuda_available() -> bool:
    """True only when both torch and CTranslate2 can use a CUDA device."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import ctranslate2

        return bool(ctranslate2.get_cuda_device_count() > 0)
    except Exception:  # a broken CUDA install means "no CUDA", not a crash
        logger.warning("CUDA probe failed; using the CPU", exc_info=True)
        return False


def choose_device(preference: str = "auto", compute_type: str | None = None) -> DeviceChoice:
    """Resolve a configured device preference to a concrete device.

    ``auto`` takes CUDA when torch and CTranslate2 both see a GPU, else the CPU. Without an
    explicit ``compute_type`` the CPU runs int8 and CUDA float16 (the fastest safe choices).

    Raises:
        InvalidArgument: unknown preference or compute type, or ``cuda`` asked for on a
            machine without a usable GPU.
    """
    pref = preference.strip().lower()
    if pref not in DEVICES:
        raise InvalidArgument(f"unknown device {preference!r}; use one of {', '.join(DEVICES)}")
    if compute_type is not None and compute_type not in COMPUTE_TYPES:
        raise InvalidArgument(f"unknown compute type {compute_type!r}; use one of {', '.join(COMPUTE_TYPES)}")
    has_cuda = cuda_available()
    if pref == "cuda" and not has_cuda:
        raise InvalidArgument("device 'cuda' was requested but no CUDA device is usable; use 'cpu' or 'auto'")
    device = "cuda" if pref == "cuda" or (pref == "auto" and has_cuda) else "cpu"
    chosen = DeviceChoice(device=device, compute_type=compute_type or DEFAULT_COMPUTE_TYPE[device])
    logger.info("device chosen", extra={"device": chosen.device, "compute_type": chosen.compute_type})
    return chosen


def on_passing_thread(work: Callable[[], T], name: str) -> T:
    """``work()`` on a new thread that ends with it (the caller's context variables carried over);
    its result, or its exception raised here.

    For CTranslate2 model loads. A load runs parallel loops on the calling thread's own OpenMP
    team, and libgomp keeps that team's threads for as long as the caller lives. One left on a
    pool thread makes libgomp count more threads than cores, and from then on every team in the
    process sleeps between parallel regions instead of spinning: on 2 cores the 2-thread
    decoder calls then took 2.0-2.4x as long (docs/performance.md, "OpenMP teams left by a load").
    The team leaves with the thread.
    """
    context = contextvars.copy_context()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = context.run(work)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


class BlasThreads:
    """numpy's BLAS thread count for this process: the service's limit, and bursts of the library's
    own count for the few calls that are worth both cores (a large eigendecomposition).

    The limit is process-wide, so bursts are counted: the first one raises it, the last one to end
    puts the limit back, whatever order concurrent callers leave in.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._limit = 0  # 0: no limit set, bursts change nothing
        self._own = 0
        self._bursts = 0

    def limit(self, threads: int) -> list[dict[str, object]]:
        """numpy's BLAS runs on ``threads`` threads in this process from now on (0: the library's
        own count). An idle OpenBLAS thread spins on its core for a while after each call, which
        on a CPU that CTranslate2's threads keep busy is time taken from the decodes. Returns the
        BLAS libraries as threadpoolctl sees them afterwards (for the start-up log)."""
        with self._lock:
            if not self._own:
                self._own = max((n for _, n in _blas_libraries()), default=1)
            self._limit = threads
            if not self._bursts:
                _set_blas_threads(threads or self._own)
        return [{"library": library, "threads": threads} for library, threads in _blas_libraries()]

    @property
    def bursting(self) -> bool:
        """A burst is on (in any thread)."""
        return self._bursts > 0

    @contextmanager
    def burst(self) -> Iterator[None]:
        """The library's own thread count for the calls inside (other threads' BLAS calls too,
        while it lasts); the limit again when the last burst ends."""
        with self._lock:
            self._bursts += 1
            if self._bursts == 1 and 0 < self._limit < self._own:
                _set_blas_threads(self._own)
        try:
            yield
        finally:
            with self._lock:
                self._bursts -= 1
                if not self._bursts and 0 < self._limit < self._own:
                    _set_blas_threads(self._limit)


def _set_blas_threads(threads: int) -> None:
    # threadpoolctl lets only the first thread that set OpenBLAS's count set it again, and ignores
    # every other thread without a word; bursts come from job threads, serialised by our lock.
    threadpoolctl.OpenBLASController.clear_controlling_thread(force=True)
    threadpoolctl.threadpool_limits(limits=threads, user_api="blas")
    threadpoolctl.OpenBLASController.clear_controlling_thread(force=True)


def _blas_libraries() -> list[tuple[object, int]]:
    return [
        (info.get("internal_api"), int(info.get("num_threads") or 1))
        for info in threadpoolctl.threadpool_info()
        if info.get("user_api") == "blas"
    ]


BLAS_THREADS = BlasThreads()
