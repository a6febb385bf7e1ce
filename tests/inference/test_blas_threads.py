"""numpy's BLAS on ``blas_threads`` threads (1 by default): an idle OpenBLAS thread spins on its core
after each call, taking CPU from CTranslate2's threads. The per-process cases run in a fresh
interpreter (the limit is process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import threadpoolctl

from tests.support import REPO_ROOT, run_probe

PROBE = """
import json, os, sys, threading
import numpy as np
import threadpoolctl
from inference_service.engines.device import BLAS_THREADS

def others_cpu():
    '''CPU seconds of every thread of this process but the calling one.'''
    me, total = threading.get_native_id(), 0.0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == me:
            continue
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total

own = [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
libraries = BLAS_THREADS.limit(int(sys.argv[1]))
a = np.random.default_rng(0).standard_normal((600, 600)).astype(np.float32)
before = others_cpu()
for _ in range(200):
    a @ a
print(json.dumps({"own": own, "libraries": libraries, "others_cpu": others_cpu() - before}))
"""


def probe(threads: int) -> dict[str, Any]:
    return run_probe(PROBE, str(threads), drop_env=lambda key: key.endswith("_NUM_THREADS"))


def test_one_blas_thread_leaves_the_other_threads_idle() -> None:
    out = probe(1)
    assert out["libraries"] == [{"library": "openblas", "threads": 1}]
    # 200 products of 600 x 600 take ~0.8 s of CPU (on 2 threads 0.4 s of it on the other one); with
    # one thread, none on another.
    assert out["others_cpu"] < 0.1, out


def test_zero_keeps_the_librarys_own_count() -> None:
    out = probe(0)
    assert out["libraries"] == [{"library": "openblas", "threads": out["own"][0]}]
    if out["own"][0] >= 2:  # the case the default exists for: OpenBLAS's helpers do work
        assert out["others_cpu"] > 0.2, out


def test_the_service_runs_blas_on_one_thread_by_default(start_inference: Any) -> None:
    threadpoolctl.threadpool_limits(limits=2, user_api="blas")  # as numpy starts on 2 cores
    start_inference()
    blas = [info for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
    assert blas and all(info["num_threads"] == 1 for info in blas), blas


BURSTS = """
import json, threading
import numpy as np
import threadpoolctl
from inference_service.engines import speaker_clustering
from inference_service.engines.device import BLAS_THREADS

def blas():
    return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]

own = blas()
BLAS_THREADS.limit(1)
seen = {"limited": blas()}
a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

def a():
    with BLAS_THREADS.burst():
        a_in.set()
        b_in.wait()
    a_out.set()

def b():
    a_in.wait()
    with BLAS_THREADS.burst():
        b_in.set()
        a_out.wait()
        seen["b alone in its burst"] = blas()

threads = [threading.Thread(target=a), threading.Thread(target=b)]
for t in threads:
    t.start()
for t in threads:
    t.join()
seen["after both"] = blas()

eigh = np.linalg.eigh
def recording_eigh(matrix):
    seen.setdefault("clustering's eigh", blas())  # the first clustering, alone
    return eigh(matrix)
np.linalg.eigh = recording_eigh
kmeans = speaker_clustering._kmeans
def recording_kmeans(points, k):
    # scikit-learn sets BLAS to one thread around k-means and puts back what it found: begun in one
    # clustering's burst and ended after the last burst, it would leave the library's count on.
    seen.setdefault("k-means inside the burst", BLAS_THREADS.bursting)
    return kmeans(points, k)
speaker_clustering._kmeans = recording_kmeans
rng = np.random.default_rng(0)
embeddings = np.concatenate([rng.normal(c, 0.3, (60, 16)) for c in (-1.0, 1.0)])
found = {}
# In a job thread, as in the service (threadpoolctl alone would ignore a thread that did not set the limit).
clustering = threading.Thread(target=lambda: found.update(labels=speaker_clustering.cluster_embeddings(embeddings)))
clustering.start()
clustering.join()
labels = found["labels"]
seen["after clustering"] = blas()
# Clusterings side by side: scikit-learn's own BLAS limit around k-means (it puts back what it found)
# and the bursts interleave; the limit must be back when the last one ends.
together = [
    threading.Thread(target=lambda: [speaker_clustering.cluster_embeddings(embeddings) for _ in range(5)])
    for _ in range(3)
]
for t in together:
    t.start()
for t in together:
    t.join()
seen["after clusterings side by side"] = blas()
print(json.dumps({"own": own, "seen": seen, "speakers": len(set(labels.tolist()))}))
"""


def test_clustering_runs_its_eigendecomposition_on_every_blas_thread_and_puts_the_limit_back() -> None:
    out = run_probe(BURSTS, drop_env=lambda key: key.endswith("_NUM_THREADS"))
    own, seen = out["own"], out["seen"]
    assert len(own) >= 1 and seen["limited"] == [1] * len(own)  # numpy's OpenBLAS and scipy's alike
    # Bursts overlap: the one that ends first leaves the library's count to the other.
    assert seen["b alone in its burst"] == own
    assert seen["clustering's eigh"] == own
    assert seen["after both"] == seen["after clustering"] == [1] * len(own)
    assert seen["after clusterings side by side"] == [1] * len(own)
    assert seen["k-means inside the burst"] is True
    assert out["speakers"] == 2


def test_a_negative_blas_threads_stops_the_service_with_exit_2_naming_the_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "inference_service", "--port", "0", "--metrics-port", "-1"],
        cwd=REPO_ROOT,
        env={**os.environ, "VOXSERVE_BLAS_THREADS": "-1", "VOXSERVE_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "blas_threads" in result.stderr and "Traceback" not in result.stderr
