"""CTranslate2's threads on this CPU: the encoder and the decoder of tiny.en int8 on 1 and on 2
OpenMP threads, and 8 different 30 s windows decoded by one 2-thread worker against two 1-thread
workers (``num_workers`` 2, weights shared) against one batch of 8 on 2 threads, against the
hybrid (encoder calls on a 2-thread model, decoder calls on a second model with two 1-thread
workers, both in one process).

Each configuration runs in a fresh process (an OpenMP team is per process, and libgomp throttles
its spinning once a process holds more threads than cores), the configurations alternate per
round, figures are medians. Windows are real speech (speech_multi.wav looped, as in
bench_batching's limit); each decode is faster-whisper's first-window decode (beam 5).

    .venv/bin/python -m bench.bench_ct2_threads            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ctranslate2
import numpy as np
from faster_whisper.audio import decode_audio

from bench import benchlib
from bench.bench_batching import SAMPLE_RATE, Decoding, features, speech_windows
from tests.support import DATA_DIR, REPO_ROOT, TINY_EN_DIR

LENGTHS = (5, 11, 30)  # seconds of speech in the window (padded to 30 s, as faster-whisper feeds it)
CONFIGS = ((2, 1), (1, 2), (0, 0))  # (threads per worker, workers); (0, 0): the hybrid
PARALLEL_WINDOWS = 8


def child(threads: int, workers: int) -> dict[str, Any]:
    """One round of every case in this process: per-op times, then the 8 windows."""
    model = benchlib.load_whisper(
        TINY_EN_DIR, device="cpu", compute_type="int8", cpu_threads=threads, num_workers=workers
    )
    decoding = Decoding(model, 5)
    speech = np.tile(decode_audio(str(DATA_DIR / "speech_multi.wav")), 3)

    def decode(window: np.ndarray) -> tuple[float, float, list[int]]:
        started = time.perf_counter()
        encoded = decoding.model.encode(ctranslate2.StorageView.from_array(window), to_cpu=False)
        middle = time.perf_counter()
        result = decoding.model.generate(encoded, [decoding.prompt], **decoding.options)[0]
        return middle - started, time.perf_counter() - middle, list(result.sequences_ids[0])

    ops: dict[str, Any] = {}
    for seconds in LENGTHS:
        window = features(model, speech[: seconds * SAMPLE_RATE])
        decode(window)  # first-call costs of the shape
        runs = [decode(window) for _ in range(3)]
        ops[f"{seconds}s"] = {
            "encode": statistics.median(r[0] for r in runs),
            "generate": statistics.median(r[1] for r in runs),
            "tokens": runs[0][2],
        }
    windows = speech_windows(model, PARALLEL_WINDOWS)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(decode, windows[:workers]))
        started = time.perf_counter()
        results = list(pool.map(decode, windows))
        parallel = time.perf_counter() - started
    out: dict[str, Any] = {"ops": ops, "parallel": parallel, "parallel_tokens": [r[2] for r in results]}
    if workers == 1:
        decoding.batched(windows[:2])
        out["batch"] = decoding.batched(windows).total
    return out


def hybrid_child() -> dict[str, Any]:
    """Encoder calls on a 2-thread model, one at a time; decoder calls on a second model of the same
    files with two 1-thread workers: the 8 windows, and one 30 s window alone."""
    encoder_model = benchlib.load_whisper(TINY_EN_DIR, device="cpu", compute_type="int8", cpu_threads=2)
    decoder_model = benchlib.load_whisper(TINY_EN_DIR, device="cpu", compute_type="int8", cpu_threads=1, num_workers=2)
    encoding, decoding = Decoding(encoder_model, 5), Decoding(decoder_model, 5)
    encoder_lock = threading.Lock()

    def decode(window: np.ndarray) -> list[int]:
        with encoder_lock:
            encoded = encoding.model.encode(ctranslate2.StorageView.from_array(window), to_cpu=False)
        result = decoding.model.generate(encoded, [decoding.prompt], **decoding.options)[0]
        return list(result.sequences_ids[0])

    windows = speech_windows(encoder_model, PARALLEL_WINDOWS)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(decode, windows[:2]))
        started = time.perf_counter()
        tokens = list(pool.map(decode, windows))
        parallel = time.perf_counter() - started
    alone = []
    for _ in range(3):
        started = time.perf_counter()
        decode(windows[0])
        alone.append(time.perf_counter() - started)
    return {"parallel": parallel, "parallel_tokens": tokens, "alone_30s": statistics.median(alone)}


def run_child(threads: int, workers: int) -> dict[str, Any]:
    """``threads`` 0: the hybrid."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.bench_ct2_threads", "--child", str(threads), str(workers)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    benchlib.add_run_options(parser, "bench_ct2_threads")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child) if args.child[0] else hybrid_child()))
        return
    quiet, audit = benchlib.start_run(args, "bench_ct2_threads")
    if args.quick:
        args.rounds = 1
    rounds: dict[str, list[dict[str, Any]]] = {f"{t}x{w}": [] for t, w in CONFIGS}
    for round_ in range(args.rounds):
        for threads, workers in CONFIGS if round_ % 2 == 0 else CONFIGS[::-1]:
            print(f"round {round_ + 1}: {workers} worker(s) x {threads} thread(s)", flush=True)
            rounds[f"{threads}x{workers}"].append(run_child(threads, workers))

    def median(config: str, *path: str) -> float:
        values = []
        for run in rounds[config]:
            value: Any = run
            for key in path:
                value = value[key]
            values.append(float(value))
        return statistics.median(values)

    hybrid = rounds.pop("0x0")
    ops = {
        config: {
            f"{s}s": {part: median(config, "ops", f"{s}s", part) for part in ("encode", "generate")} for s in LENGTHS
        }
        for config in rounds
    }
    same_tokens = all(
        run["ops"][f"{s}s"]["tokens"] == rounds["2x1"][0]["ops"][f"{s}s"]["tokens"]
        and run["parallel_tokens"] == rounds["2x1"][0]["parallel_tokens"]
        for config in rounds
        for run in rounds[config]
        for s in LENGTHS
    )
    same_tokens = same_tokens and all(run["parallel_tokens"] == rounds["2x1"][0]["parallel_tokens"] for run in hybrid)
    one_worker, two_workers, batch = median("2x1", "parallel"), median("1x2", "parallel"), median("2x1", "batch")
    hybrid_parallel = statistics.median(run["parallel"] for run in hybrid)
    hybrid_alone = statistics.median(run["alone_30s"] for run in hybrid)
    alone = ops["2x1"]["30s"]["encode"] + ops["2x1"]["30s"]["generate"]
    benchlib.print_table(
        "One window on 2 threads vs 1 (tiny.en int8, beam 5; seconds, medians)",
        ["window", "encode 2 thr", "encode 1 thr", "generate 2 thr", "generate 1 thr"],
        [
            [
                f"{s} s",
                f"{ops['2x1'][f'{s}s']['encode']:.3f}",
                f"{ops['1x2'][f'{s}s']['encode']:.3f}",
                f"{ops['2x1'][f'{s}s']['generate']:.3f}",
                f"{ops['1x2'][f'{s}s']['generate']:.3f}",
            ]
            for s in LENGTHS
        ],
    )
    benchlib.print_table(
        f"{PARALLEL_WINDOWS} different 30 s windows (encode + generate each)",
        ["how", "seconds", "speed-up"],
        [
            ["one worker, 2 threads, one by one", f"{one_worker:.2f}", "1.00x"],
            ["two workers, 1 thread each", f"{two_workers:.2f}", f"{one_worker / two_workers:.2f}x"],
            ["one batch of 8, 2 threads", f"{batch:.2f}", f"{one_worker / batch:.2f}x"],
            [
                "encode on a 2-thread model, generate on two 1-thread workers",
                f"{hybrid_parallel:.2f}",
                f"{one_worker / hybrid_parallel:.2f}x",
            ],
        ],
    )
    print(f"one 30 s window alone: {alone:.3f} s on 2 threads, {hybrid_alone:.3f} s encoded on 2 and decoded on 1")
    print(f"same tokens in every configuration: {same_tokens}")
    payload = {
        "rounds": args.rounds,
        "ops": ops,
        "parallel": {"one_worker_2_threads": one_worker, "two_workers_1_thread": two_workers, "batch_of_8": batch},
        "speedup_two_workers": one_worker / two_workers,
        "speedup_batch": one_worker / batch,
        "hybrid": {"parallel": hybrid_parallel, "alone_30s": hybrid_alone, "alone_30s_2_threads": alone},
        "speedup_hybrid": one_worker / hybrid_parallel,
        "same_tokens": same_tokens,
    }
    benchlib.write_result(args.name, benchlib.rounded(payload), audit, quiet)


if __name__ == "__main__":
    main()
