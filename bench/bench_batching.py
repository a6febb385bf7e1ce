"""The limit of decode batching itself: N windows of real speech encoded and decoded by
CTranslate2 as one batch vs one by one.

Each window is a 30 s span of tests/data speech (speech_multi.wav looped, each window starting
elsewhere), as faster-whisper feeds it (3000 mel frames). Per round, alternating which leg goes
first:

  one by one  per window: ``encode`` of batch 1, then ``generate`` with the first-window prompt
              (what faster-whisper's sequential path calls)
  batched     the scheduler's own calls (``batch_ops.run_encode`` / ``run_generate``): one
              ``encode`` of N windows, split per item, stacked again, one ``generate`` of N
              prompts (the copies the scheduler makes are in the figure)

Reported per N (2, 4, 8): medians of both legs, the speed-up (one by one / batched), and
whether every item's tokens and score came out as alone. The ``11s+30s`` case batches an 11 s
request's window (padded to 30 s, as faster-whisper pads every window) with a 30 s one: the
speed-up, and what the batch costs the 11 s request (batched / its window alone).

    .venv/bin/python -m bench.bench_batching            # 5 rounds
    .venv/bin/python -m bench.bench_batching --quick    # 1 round: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from bench import benchlib
from inference_service.audio import decode_audio
from inference_service.engines.batch_ops import EncodeCall, GenerateCall, run_encode, run_generate
from tests.support import DATA_DIR, TINY_EN_DIR

SAMPLE_RATE = 16000
WINDOW_FRAMES = 3000
SIZES = (2, 4, 8)
SHORT_SECONDS = 11.0
STRIDE_SECONDS = 3.7  # where window i starts in the looped speech: windows differ in content


def speech_windows(model: WhisperModel, count: int) -> list[np.ndarray]:
    """``count`` 30 s windows of real speech, ``(1, n_mels, 3000)`` float32 each."""
    speech = decode_audio((DATA_DIR / "speech_multi.wav").read_bytes())
    looped = np.tile(speech, 2 + int(count * STRIDE_SECONDS / (speech.shape[0] / SAMPLE_RATE)))
    windows = []
    for index in range(count):
        start = int(index * STRIDE_SECONDS * SAMPLE_RATE)
        windows.append(features(model, looped[start : start + 30 * SAMPLE_RATE]))
    return windows


def features(model: WhisperModel, audio: np.ndarray) -> np.ndarray:
    """The window faster-whisper would encode: mel of the audio, padded (or cut) to 3000 frames."""
    mel = model.feature_extractor(audio, padding=0)[:, :-1]
    window = np.zeros((mel.shape[0], WINDOW_FRAMES), np.float32)
    window[:, : min(WINDOW_FRAMES, mel.shape[1])] = mel[:, :WINDOW_FRAMES]
    return window[None]


class Decoding:
    """The first-window decode of faster-whisper's sequential path (beam search, its defaults)."""

    def __init__(self, model: WhisperModel, beam_size: int) -> None:
        tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en")
        self.model = model.model
        self.prompt = list(tokenizer.sot_sequence)
        self.options: dict[str, Any] = {
            "beam_size": beam_size,
            "patience": 1.0,
            "length_penalty": 1.0,
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "max_length": 448,
            "return_scores": True,
            "return_no_speech_prob": True,
            "suppress_blank": True,
            "suppress_tokens": get_suppressed_tokens(tokenizer, [-1]),
            "max_initial_timestamp_index": 50,
        }

    def one_by_one(self, windows: Sequence[np.ndarray]) -> list[Any]:
        results = []
        for window in windows:
            output = self.model.encode(ctranslate2.StorageView.from_array(window), to_cpu=False)
            results.extend(self.model.generate(output, [self.prompt], **self.options))
        return results

    def batched(self, windows: Sequence[np.ndarray]) -> list[Any]:
        outputs = run_encode(self.model, [EncodeCall(window, False) for window in windows])
        return run_generate(self.model, [GenerateCall(output, self.prompt, self.options) for output in outputs])


def timed(work: Callable[[], list[Any]]) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    results = work()
    return time.perf_counter() - started, results


def same(a: Any, b: Any) -> bool:
    return bool(a.sequences_ids == b.sequences_ids and a.scores == b.scores)


def measure(decoding: Decoding, windows: list[np.ndarray], rounds: int) -> dict[str, Any]:
    """Both legs, alternating which goes first; medians, the speed-up, items equal to alone."""
    single: list[float] = []
    batch: list[float] = []
    differing = 0
    for round_ in range(rounds):
        legs = [("single", decoding.one_by_one), ("batch", decoding.batched)]
        results: dict[str, list[Any]] = {}
        for name, leg in legs if round_ % 2 == 0 else legs[::-1]:
            seconds, results[name] = timed(lambda leg=leg: leg(windows))
            (single if name == "single" else batch).append(seconds)
        differing += sum(not same(a, b) for a, b in zip(results["single"], results["batch"], strict=True))
    return {
        "one_by_one": benchlib.summarize(single),
        "batched": benchlib.summarize(batch),
        "speedup": statistics.median(single) / statistics.median(batch),
        "items_differing_from_alone": differing,
        "items_compared": rounds * len(windows),
    }


def measure_short_with_long(decoding: Decoding, model: WhisperModel, rounds: int) -> dict[str, Any]:
    speech = np.tile(decode_audio((DATA_DIR / "speech_multi.wav").read_bytes()), 2)
    short = features(model, speech[: int(SHORT_SECONDS * SAMPLE_RATE)])
    long = features(model, speech[5 * SAMPLE_RATE : 35 * SAMPLE_RATE])
    figures = measure(decoding, [short, long], rounds)
    short_alone = [timed(lambda: decoding.one_by_one([short]))[0] for _ in range(rounds)]
    figures["short_alone"] = benchlib.summarize(short_alone)
    figures["short_latency_in_batch"] = figures["batched"]["median"] / statistics.median(short_alone)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per case")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--beam-size", type=int, default=5, help="the service's default beam")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--compute-type", default=None, help="default int8 on cpu, float16 on cuda")
    parser.add_argument("--cpu-threads", type=int, default=0, help="0 = CTranslate2's default")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round")
    benchlib.add_run_options(parser, "bench_batching")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    quiet, audit = benchlib.start_run(args, "bench_batching")
    compute_type = args.compute_type or ("int8" if args.device == "cpu" else "float16")
    model = WhisperModel(str(TINY_EN_DIR), device=args.device, compute_type=compute_type, cpu_threads=args.cpu_threads)
    decoding = Decoding(model, args.beam_size)
    windows = speech_windows(model, max(args.sizes))
    decoding.one_by_one(windows[:1])  # CTranslate2's first-call costs, outside the figures
    decoding.batched(windows[:2])
    cases: dict[str, Any] = {}
    for size in args.sizes:
        print(f"batch of {size} x 30 s", flush=True)
        cases[f"batch_{size}"] = measure(decoding, windows[:size], args.rounds)
    print(f"{SHORT_SECONDS:g} s + 30 s", flush=True)
    cases["11s+30s"] = measure_short_with_long(decoding, model, args.rounds)
    benchlib.print_table(
        "one CTranslate2 batch vs one by one (encode + generate, first-window prompt)",
        ["case", "one by one", "batched", "speed-up", "items differing"],
        [
            [
                name,
                benchlib.fmt_spread(case["one_by_one"], 1, " s"),
                benchlib.fmt_spread(case["batched"], 1, " s"),
                f"{case['speedup']:.2f}x",
                f"{case['items_differing_from_alone']}/{case['items_compared']}",
            ]
            for name, case in cases.items()
        ],
    )
    settings = {
        "model": "tiny.en",
        "device": args.device,
        "compute_type": compute_type,
        "cpu_threads": args.cpu_threads,
        "beam_size": args.beam_size,
        "rounds": args.rounds,
    }
    payload = benchlib.rounded({"settings": settings, "cases": cases})
    summary = {name: round(case["speedup"], 3) for name, case in cases.items()}
    summary["11s_latency_in_batch"] = round(cases["11s+30s"]["short_latency_in_batch"], 3)
    print(json.dumps({"speedup": summary, "machine_load": audit.result()}))
    benchlib.write_result(args.name, payload, audit, quiet)


if __name__ == "__main__":
    main()
