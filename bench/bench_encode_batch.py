"""Encoder batches on this CPU: for windows of each length, one ``encode`` of N windows against the
same N one by one, beside what ``batch_ops.EncodeBudget`` allows (the decode scheduler's cap on
the CPU: as many windows as fit the last-level cache with their attention scores).

Windows are real speech (tests/data speech_multi.wav looped, as in bench_batching's limit), cut to
each length in mel frames; legs alternate which goes first; medians of ``--rounds``.

    .venv/bin/python -m bench.bench_encode_batch            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from bench import benchlib
from bench.bench_batching import speech_windows
from inference_service.engines.batch_ops import EncodeCall, encode_budget, run_encode
from tests.support import TINY_EN_DIR

LENGTHS = (500, 1000, 1250, 1500, 2000, 3000)  # mel frames: 5 s to 30 s
SIZES = (2, 3, 4)


def timed(model: Any, windows: list[np.ndarray], batched: bool) -> float:
    started = time.perf_counter()
    if batched:
        run_encode(model, [EncodeCall(w, False) for w in windows])
    else:
        for window in windows:
            run_encode(model, [EncodeCall(window, False)])
    return time.perf_counter() - started


def measure(model: Any, windows: list[np.ndarray], rounds: int) -> dict[str, float]:
    legs: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(rounds):
        for batched in (False, True) if round_ % 2 == 0 else (True, False):
            legs[batched].append(timed(model, windows, batched))
    one_by_one, batch = statistics.median(legs[False]), statistics.median(legs[True])
    return {"one_by_one": one_by_one, "batched": batch, "speedup": one_by_one / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    benchlib.add_run_options(parser, "bench_encode_batch")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    quiet, audit = benchlib.start_run(args, "bench_encode_batch")
    whisper = benchlib.load_whisper(TINY_EN_DIR, device="cpu", compute_type="int8")
    model = whisper.model
    budget = encode_budget(model)
    assert budget is not None
    windows = speech_windows(whisper, max(SIZES))
    cases: dict[str, Any] = {}
    for frames in LENGTHS:
        cut = [np.ascontiguousarray(w[:, :, :frames]) for w in windows]
        timed(model, cut[:1], batched=False)  # first-call costs of this shape
        cases[str(frames)] = {
            "allowed": budget.windows(frames),
            "sizes": {str(n): measure(model, cut[:n], rounds) for n in SIZES},
        }
    benchlib.print_table(
        f"Encoder batch over one by one (tiny.en int8; budget: {budget.cache_bytes >> 20} MiB cache, "
        f"{budget.heads} heads)",
        ["mel frames", *(f"batch {n}" for n in SIZES), "budget allows"],
        [
            [frames, *(f"{case['sizes'][str(n)]['speedup']:.2f}x" for n in SIZES), case["allowed"]]
            for frames, case in cases.items()
        ],
    )
    payload = {"rounds": rounds, "budget": {"cache_bytes": budget.cache_bytes, "heads": budget.heads}, "cases": cases}
    benchlib.write_result(args.name, benchlib.rounded(payload), audit, quiet)


if __name__ == "__main__":
    main()
