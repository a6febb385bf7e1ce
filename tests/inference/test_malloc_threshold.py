"""glibc's pinned mmap threshold (inference_service.memory): 32 MiB while serving, so a batched
decode's freed buffers are reused from the heap instead of being mapped and zeroed again on every
call, and 4 MiB while a model loads (``low_mmap_threshold``), so a load's freed buffers leave the
process and the RSS delta the model cache measures around it is the model's (a tiny.en int8 load
measured 180 MiB instead of 76 after glibc had raised a dynamic threshold). And at most two malloc
arenas, so that the tops of more threads' heaps do not keep the RSS creeping (the soak test). Each
case runs in a fresh interpreter: the setting is per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import REPO_ROOT

PROBE = """
import ctypes, json, resource, sys
import psutil
from inference_service.memory import low_mmap_threshold, pin_malloc_thresholds
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MIB = 1 << 20

def kept(size):
    '''The share of a freed, written block of ``size`` bytes still resident after free(), the heap
    trimmed first as the model cache does before a load.'''
    libc.malloc_trim(0)
    before = psutil.Process().memory_info().rss
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    return (psutil.Process().memory_info().rss - before) / size

def faults(size):
    '''Page faults of writing a fresh block of ``size`` bytes, per page of it.'''
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (size // 4096)

mode = sys.argv[1]
pinned = pin_malloc_thresholds() if mode != "none" else False
libc.free(libc.malloc(30 * MIB))  # a freed mapped block this big raises glibc's dynamic threshold to it
out = {"pinned": pinned}
if mode == "none":
    out["load"] = kept(8 * MIB)
elif mode == "serving":
    faults(24 * MIB)
    out["refault"] = faults(24 * MIB)
    out["above"] = kept(40 * MIB)
elif mode == "load":
    with low_mmap_threshold():
        out["load"] = kept(8 * MIB)
    out["after"] = kept(8 * MIB)
elif mode == "overlap":
    first, second = low_mmap_threshold(), low_mmap_threshold()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    out["one_left"] = kept(8 * MIB)
    second.__exit__(None, None, None)
    out["after"] = kept(8 * MIB)
print(json.dumps(out))
"""


ARENAS_PROBE = """
import ctypes, json, sys, tempfile, threading
from inference_service.memory import limit_malloc_arenas, pin_malloc_thresholds
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]

def arenas():
    '''How many arenas glibc has: one <heap> element each in malloc_info's report.'''
    with tempfile.NamedTemporaryFile(suffix=".xml") as report:
        stream = libc.fopen(report.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        return open(report.name).read().count("<heap nr=")

mode = sys.argv[1]
limited = (pin_malloc_thresholds() and limit_malloc_arenas()) if mode == "pinned" else False
both_waits = threading.Barrier(9)

def hold_a_block():
    block = libc.malloc(1 << 20)
    both_waits.wait()  # every thread holds its block while the arenas are counted
    both_waits.wait()
    libc.free(block)

threads = [threading.Thread(target=hold_a_block) for _ in range(8)]
for thread in threads:
    thread.start()
both_waits.wait()
count = arenas()
both_waits.wait()
for thread in threads:
    thread.join()
print(json.dumps({"limited": limited, "arenas": count}))
"""


def run_probe(mode: str, probe: str = PROBE, **env: str) -> dict[str, float]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run(
        [sys.executable, "-c", probe, mode], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=environment
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, float] = json.loads(out.stdout)
    return result


def test_a_load_under_the_low_threshold_gives_its_freed_buffers_back() -> None:
    result = run_probe("load")
    assert result["pinned"]
    assert result["load"] < 0.2, f"{result['load']:.0%} of a freed 8 MiB block resident during a load"
    assert result["after"] > 0.8, (
        f"only {result['after']:.0%} resident after the load: the serving threshold is not back"
    )
    # Without the pins, glibc's raised dynamic threshold keeps the block: what the low one is for.
    assert run_probe("none")["load"] > 0.8


def test_while_serving_freed_buffers_below_32_mib_are_reused_without_new_page_faults() -> None:
    result = run_probe("serving")
    assert result["pinned"]
    assert result["refault"] < 0.1, f"{result['refault']:.2f} page faults per page writing a reused 24 MiB block"
    assert result["above"] < 0.2, f"{result['above']:.0%} of a freed 40 MiB block resident (above the threshold)"


def test_overlapping_loads_keep_the_low_threshold_until_the_last_one_ends() -> None:
    result = run_probe("overlap")
    assert result["one_left"] < 0.2, "the low threshold ended with the first of two overlapping loads"
    assert result["after"] > 0.8, "the serving threshold did not come back after the last load"


def test_an_operators_malloc_setting_wins() -> None:
    result = run_probe("load", MALLOC_MMAP_THRESHOLD_=str(64 << 20), MALLOC_TRIM_THRESHOLD_=str(128 << 20))
    assert not result["pinned"]
    assert result["load"] > 0.8, "a load lowered the operator's mmap threshold"


def test_eight_threads_share_two_malloc_arenas() -> None:
    result = run_probe("pinned", ARENAS_PROBE)
    assert result["limited"]
    assert result["arenas"] <= 2, f"{result['arenas']} arenas for 8 threads"
    # Without the limit each thread that mallocs while the others hold theirs gets its own.
    assert run_probe("none", ARENAS_PROBE)["arenas"] > 2


def test_an_operators_arena_limit_wins() -> None:
    result = run_probe("pinned", ARENAS_PROBE, MALLOC_ARENA_MAX="4")
    assert not result["limited"]
    assert result["arenas"] == 4, f"{result['arenas']} arenas under the operator's MALLOC_ARENA_MAX=4"
