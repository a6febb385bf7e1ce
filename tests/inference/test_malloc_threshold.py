"""The pinned glibc mmap threshold (inference_service.memory.pin_malloc_thresholds): a freed
block above it leaves the process at once, even after glibc would have raised a dynamic
threshold. Without it, the RSS delta the model cache measures around a load could count a
load's freed buffers (a tiny.en int8 load measured 180 MiB instead of 76 after other tests).
Each case runs in a fresh interpreter: the setting is per process and cannot be undone."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import REPO_ROOT

PROBE = """
import ctypes, sys
import psutil
from inference_service.memory import MMAP_THRESHOLD_BYTES, pin_malloc_thresholds
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
pinned = pin_malloc_thresholds() if sys.argv[1] == "pin" else False
libc.free(libc.malloc(30 << 20))  # freeing a mapped 30 MiB block raises glibc's dynamic threshold to it
size = 2 * MMAP_THRESHOLD_BYTES
before = psutil.Process().memory_info().rss
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(block)
print(pinned, (psutil.Process().memory_info().rss - before) / size)
"""


def run_probe(mode: str, **env: str) -> tuple[bool, float]:
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=environment
    )
    assert out.returncode == 0, out.stderr
    pinned, kept = out.stdout.split()
    return pinned == "True", float(kept)


def test_a_freed_block_above_the_pinned_threshold_leaves_the_process() -> None:
    pinned, kept = run_probe("pin")
    assert pinned and kept < 0.2, f"{kept:.0%} of the freed block still resident"
    # The same steps without the pin keep the block resident: what the pin is for.
    _, kept = run_probe("none")
    assert kept > 0.8, f"only {kept:.0%} of the freed block resident without the pin"


def test_an_operators_malloc_setting_wins() -> None:
    pinned, _ = run_probe("pin", MALLOC_MMAP_THRESHOLD_=str(64 << 20))
    assert not pinned
