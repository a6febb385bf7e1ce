"""How much memory the device has and the process uses, and how to read a memory budget."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import psutil

from voxserve_common.errors import InvalidArgument

logger = logging.getLogger(__name__)

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>%|[a-zA-Z]*)\s*$")


def parse_memory_budget(text: str, total: int) -> int:
    """Turn "80%", "2GiB", "512MB" or "1073741824" into bytes.

    A percentage is of ``total`` (the device's memory) and must lie in (0, 100]. Units
    follow SI/IEC: ``MB`` = 10**6, ``MiB`` = 2**20 (``M`` / ``Mi`` likewise, as Kubernetes
    reads them), case-insensitive. Raises InvalidArgument naming the value for anything
    else, and for a budget of zero bytes.
    """
    match = _BUDGET_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidArgument(
            f"memory budget {text!r} is not understood; use a percentage of device memory "
            "('80%'), a size ('2GiB', '512MB') or a number of bytes"
        )
    number = float(match["number"])
    unit = match["unit"].lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise InvalidArgument(f"memory budget {text!r} must be a percentage in (0, 100]")
        budget = int(total * number / 100)
    elif unit in _UNITS:
        budget = int(number * _UNITS[unit])
    else:
        raise InvalidArgument(
            f"memory budget {text!r} has an unknown unit {match['unit']!r}; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
        )
    if budget <= 0:
        raise InvalidArgument(f"memory budget {text!r} is zero bytes")
    return budget


def format_bytes(n: int | float) -> str:
    """A size for people: '74.3 MiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def device_index(device: str) -> int:
    """The CUDA index of 'cuda' / 'cuda:1' (0 when not given)."""
    _, _, index = device.partition(":")
    return int(index) if index else 0


def is_cuda(device: str) -> bool:
    return device == "cuda" or device.startswith("cuda:")


@cache
def _glibc_function(name: str) -> Any:
    """``name`` from glibc, or None (not Linux, musl or no glibc: nothing to tune)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _malloc_trim() -> Any:
    return _glibc_function("malloc_trim")


# glibc raises its mmap threshold (up to 32 MiB) as mapped blocks are freed; past that, a
# model load's transient buffers come from the heap and some stay resident after
# malloc_trim. In the test suite, after the live-memory tests had run in the same process,
# a tiny.en int8 load then measured 180 MiB instead of 76, so the cache over-counted it and
# evicted models it had room for. So while a model loads (``low_mmap_threshold``), the
# threshold is 4 MiB: buffers above it get their own mappings, and those go back to the OS
# when freed. Between loads it is pinned at 32 MiB, the most glibc allows: a batched decode's
# buffers (the encoder output of two 30 s windows is 4.6 MB, a beam-5 batch's attention
# caches tens of MB) are then reused from the heap instead of being mapped, zeroed and
# unmapped on every call. At 4 MiB, a CTranslate2 batch of three file windows ran at 1.0-1.2x
# their time one by one instead of 1.5x, and the service with batching no faster than
# without it (docs/performance.md, "The mmap threshold"). Pinning a threshold also pins the
# trim threshold at its 128 KiB default, which makes glibc hand back the top of the heap
# after every large free: a 25 s transcription then took 33 % longer (0.97 vs 0.73 s, same
# process layout). So the trim threshold is set to 64 MiB, what the dynamic scheme reaches;
# the cache's explicit malloc_trim around loads and evictions, and the jobs' one when idle,
# still release it all. An operator's MALLOC_MMAP_THRESHOLD_ wins.
SERVING_MMAP_THRESHOLD_BYTES = 32 << 20
LOAD_MMAP_THRESHOLD_BYTES = 4 << 20
TRIM_THRESHOLD_BYTES = 64 << 20
# With blocks up to 32 MiB on the heap, each thread's malloc arena keeps the top of its heap
# resident after a free (a heap of another thread than the first is at most 64 MiB, under the
# trim threshold, and malloc_trim leaves those tops alone), so the RSS grew whenever one more
# of the up to 16 arenas glibc makes on 2 cores reached its high-water mark: 618 -> 662 ->
# 641 -> 607 MiB after each round of the soak test's 50 calls, and +8.8 % once in CI. Two
# arenas reach theirs in the first round and stay (512-519 MiB): MALLOC_ARENA_MAX=2, the
# usual setting of long-running Python services (docs/performance.md, "Two malloc arenas").
# An operator's MALLOC_ARENA_MAX wins.
MALLOC_ARENAS = 2
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters, glibc's malloc.h

_loads_lock = threading.Lock()
_loads_running = 0


def _mallopt() -> Any:
    """glibc's mallopt, or None where the thresholds are not ours to set (no glibc, or the
    environment sets the mmap threshold)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    return _glibc_function("mallopt")


@cache
def limit_malloc_arenas() -> bool:
    """At most ``MALLOC_ARENAS`` glibc malloc arenas in this process (once; call it before the
    threads start, as arenas already made stay); False where there is no glibc or the
    environment sets MALLOC_ARENA_MAX."""
    mallopt = None if "MALLOC_ARENA_MAX" in os.environ else _glibc_function("mallopt")
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


@cache
def pin_malloc_thresholds() -> bool:
    """Pin glibc's mmap threshold at its serving value and its trim threshold, and limit its
    arenas (once per process); False where there is no glibc or the environment sets the mmap
    threshold."""
    limit_malloc_arenas()
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


@contextlib.contextmanager
def low_mmap_threshold() -> Iterator[None]:
    """The 4 MiB mmap threshold while a model loads, so that its freed transient buffers leave
    the process and the RSS delta around the load is the model's; the serving threshold again
    once the last load that overlapped this one ends. Nothing where the thresholds are not
    pinned (see ``pin_malloc_thresholds``)."""
    global _loads_running
    mallopt = _mallopt() if pin_malloc_thresholds() else None
    if mallopt is None:
        yield
        return
    with _loads_lock:
        _loads_running += 1
        if _loads_running == 1:
            mallopt(_M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        with _loads_lock:
            _loads_running -= 1
            if _loads_running == 0:
                mallopt(_M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD_BYTES)


def _torch() -> Any:
    import torch  # imported only for CUDA: it costs a second and ~300 MB when unused

    return torch


CGROUP_LIMIT_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def cgroup_memory_limit(files: tuple[Path, ...] = CGROUP_LIMIT_FILES) -> int | None:
    """The container's memory limit (cgroup v2 or v1), None when unlimited or unknown.

    A percent budget inside a container must be a share of its limit, not of the host's
    RAM, or the default 80% gets the process OOM-killed.
    """
    for path in files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit():
            return None
        value = int(text)
        return value if value < (1 << 60) else None
    return None


class MemoryProbe:
    """Reads memory figures of this process and its device.

    The model cache takes one in its constructor so that its accounting comes from one
    place; every method reads the live system (psutil, torch.cuda).
    """

    def __init__(self) -> None:
        self._process = psutil.Process()
        pin_malloc_thresholds()  # so that an RSS delta around a load is the model's

    def device_total_bytes(self, device: str) -> int:
        """All memory of the device: system RAM for "cpu", VRAM for "cuda[:N]"."""
        if is_cuda(device):
            _free, total = _torch().cuda.mem_get_info(device_index(device))
            return int(total)
        ram = int(psutil.virtual_memory().total)
        limit = cgroup_memory_limit()
        return min(ram, limit) if limit else ram

    def device_used_bytes(self, device: str) -> int:
        """Memory in use on the whole device, by every process (RAM or VRAM)."""
        if is_cuda(device):
            free, total = _torch().cuda.mem_get_info(device_index(device))
            return int(total - free)
        vm = psutil.virtual_memory()
        return int(vm.total - vm.available)

    def process_rss_bytes(self) -> int:
        """Resident set size of this process."""
        return int(self._process.memory_info().rss)

    def cuda_allocated_bytes(self, device: str = "cuda") -> int:
        """Bytes torch's allocator holds for tensors on the device."""
        return int(_torch().cuda.memory_allocated(device_index(device)))

    def return_freed_memory(self, device: str) -> None:
        """Hand memory freed by Python/torch back to the OS (or the driver).

        Without this, glibc keeps freed arenas mapped: RSS stays high after an unload, and
        the next load's RSS delta comes out too small because it reuses those pages.
        """
        trim = _malloc_trim()
        if trim is not None:
            trim(0)
        if is_cuda(device) and "torch" in sys.modules:
            _torch().cuda.empty_cache()


def release_freed_heap() -> None:
    """Hand the heap freed since the last trim back to the OS (the jobs' ``on_idle``), logging the RSS
    before and after."""
    probe = MemoryProbe()
    before = probe.process_rss_bytes()
    started = time.perf_counter()
    probe.return_freed_memory("cpu")
    seconds = time.perf_counter() - started
    logger.info(
        "freed heap returned",
        extra={"rss_before_bytes": before, "rss_after_bytes": probe.process_rss_bytes(), "seconds": round(seconds, 4)},
    )
