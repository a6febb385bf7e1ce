"""Batch decoding across requests (issue 18): the service's decode scheduler against the service
without it, faster-whisper sequential and faster-whisper's BatchedInferencePipeline, on clients
sending a mix of 11 s, 66 s and 5 min files of real speech; and, in the same run, the limit of
batching itself on this machine.

Sections (``--sections``, all by default, in this order):

  limit       N 30 s windows of real speech (tests/data speech_multi.wav looped, each window
              starting elsewhere, 3000 mel frames as faster-whisper feeds them) encoded and
              decoded by CTranslate2 one by one (``encode`` of batch 1, then ``generate`` with the
              first-window prompt: faster-whisper's sequential path) vs as one batch (the
              scheduler's own ``batch_ops.run_encode`` / ``run_generate``, its copies included),
              alternating which goes first; encode and generate timed apart. Per N (2, 4, 8): the
              speed-up, and whether every item's tokens and score came out as alone. ``11s+30s``
              batches an 11 s request's window (padded to 30 s) with a 30 s one: what the batch
              costs the 11 s request. ``encode only`` is the speed-up when only the encoder calls
              batch (the generate calls of file windows whose previous-text prompts differ in
              length cannot share a batch: CTranslate2 needs <|startoftranscript|> at one index).
  alone       each file (11 s, 66 s, 5 min) through each service with nothing else running, and
              the 11 s and 66 s files ``--alone-reps`` times, services alternating: the latency
              alone, the words every later request is compared with, the service's CPU seconds;
              one client against today (goal: within 3 %).
  throughput  N = 1, 2, 4, 8, 16 concurrent clients; client i sends, back to back, the list of
              role i mod 3 (``ROLES``): "mixed" 66 s and 11 s files (297 s), "long" one 5 min file
              (300 s), "short" 27 files of 11 s (297 s), so every client has about the same audio
              and the level ends when the last finishes. Throughput = audio / wall seconds; the
              11 s requests' latency p50/p95 while a longer request was in flight; WER; requests
              whose words differ from the same file alone. Services alternate their order per
              level. ``--distinct``: clients of one role send their files with the pieces
              rotated (client 4 sends ``66s.1``, client 7 ``66s.2``...), so no two clients send
              the same audio at once, as separate callers would. faster-whisper in this
              process, sequential (``WhisperModel.transcribe``) and its
              ``BatchedInferencePipeline`` (batch 8), over one list of each role (894 s),
              before and after the service levels: their throughput does not depend on N.
  lane        one 5 min file, and 11 s requests back to back while it runs: their p50/p95
              against their latency alone (goal p95 <= 2x alone).

Services are real processes (``benchlib.start_service_process``: a model store and one inference
service per configuration, all started at once and idle when not measured): ``batching`` with the
service's defaults, ``today_jobs1`` / ``today_jobs2`` with max_running_jobs 1 / 2, batch_size 1,
decode_replicas 1 and prompt_bucket_tokens 0 (no cross-request batching, faster-whisper's
prompts), and any ``--service NAME:key=value,...`` (a settings candidate; an upper-case key
such as ``MALLOC_MMAP_THRESHOLD_`` is passed to the process as an environment variable).
Requests use the service's default options (beam 5, fast_first_segment on); the direct legs beam 5.
The batching services' batch-size histograms (``/metrics``) are read around each level.

Audio: JFK's inaugural line (11.0 s; ``bash bench/fetch_jfk.sh`` -> .data/bench/jfk.wav) and
tests/data speech_multi.wav (25.1 s) and speech_short.wav (3.2 s): the 66 s file is multi, JFK,
short, multi with 0.5 s gaps; the 5 min file is (multi, JFK, short) x 7 with 1.22 s gaps, so no
30 s window holds the same sentence twice (JFK x6 makes faster-whisper's compression-ratio check
fail and re-decode every window at every temperature). References: JFK's text and
tests/data/transcripts.json.

    .venv/bin/python -m bench.bench_batching --wait-quiet 1800   # ~45 min on 2 cores
    .venv/bin/python -m bench.bench_batching --quick             # a smoke run, ~4 min
    .venv/bin/python -m bench.bench_batching --sections throughput --levels 8 \\
        --service b4:batch_size=4 --services batching b4 --name bench_batching_sweep
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import statistics
import threading
import time
import urllib.request
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ctranslate2
import grpc
import numpy as np
from faster_whisper import BatchedInferencePipeline, WhisperModel
from faster_whisper import decode_audio as fw_decode_audio
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from bench import benchlib
from inference_service.audio import decode_audio
from inference_service.config import InferenceConfig
from inference_service.engines.batch_ops import EncodeCall, GenerateCall, run_encode, run_generate
from tests.support import DATA_DIR, TINY_EN_DIR, free_port, normalise, word_error_rate
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.inference.v1 import inference_pb2_grpc as pb_grpc

SAMPLE_RATE = 16000
WINDOW_FRAMES = 3000
SIZES = (2, 4, 8)
SHORT_SECONDS = 11.0
STRIDE_SECONDS = 3.7  # where window i starts in the looped speech: windows differ in content
SECTIONS = ("limit", "alone", "throughput", "lane")
LEVELS = (1, 2, 4, 8, 16)
MODEL_ID = "whisper-tiny.en"
BEAM_SIZE = 5
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.use_local_subchannel_pool", 1),  # a connection per client, as separate callers have
]
JFK_PATH = benchlib.REPO / ".data" / "bench" / "jfk.wav"
JFK_REFERENCE = (
    "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
)
# What each client sends, back to back (client i: role i mod 3); about 300 s of audio each.
ROLES: dict[str, list[str]] = {
    "mixed": ["66s", "11s"] * 3 + ["66s"],
    "long": ["5min"],
    "short": ["11s"] * 27,
}
ROLE_ORDER = ("mixed", "long", "short")
# The files: their pieces (one after the other, equal gaps of silence) and length in seconds.
FILE_PIECES: dict[str, tuple[list[str], float]] = {
    "11s": (["jfk"], 11.0),
    "66s": (["speech_multi", "jfk", "speech_short", "speech_multi"], 66.0),
    "5min": (["speech_multi", "jfk", "speech_short"] * 7, 300.0),
}
ENV_KEY = re.compile(r"[A-Z][A-Z0-9_]*")  # a --service key passed to the process as an environment variable
# The services compared: environment of each inference process (everything else at its default).
TODAY = {  # the service before issue 18: one call at a time, faster-whisper's prompts as they are
    "batch_size": "1",
    "decode_replicas": "1",
    "prompt_bucket_tokens": "0",
}
SERVICES: dict[str, dict[str, str]] = {
    "batching": {},
    "today_jobs1": {"max_running_jobs": "1", **TODAY},
    "today_jobs2": {"max_running_jobs": "2", **TODAY},
}


# =========================================================================== the limit of batching itself


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


@dataclass
class Timed:
    """Results of one leg, with its encode and generate seconds apart."""

    encode: float
    generate: float
    results: list[Any]

    @property
    def total(self) -> float:
        return self.encode + self.generate


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

    def one_by_one(self, windows: Sequence[np.ndarray]) -> Timed:
        encode = generate = 0.0
        results = []
        for window in windows:
            started = time.perf_counter()
            output = self.model.encode(ctranslate2.StorageView.from_array(window), to_cpu=False)
            encoded = time.perf_counter()
            results.extend(self.model.generate(output, [self.prompt], **self.options))
            encode += encoded - started
            generate += time.perf_counter() - encoded
        return Timed(encode, generate, results)

    def batched(self, windows: Sequence[np.ndarray]) -> Timed:
        started = time.perf_counter()
        outputs = run_encode(self.model, [EncodeCall(window, False) for window in windows])
        encoded = time.perf_counter()
        results = run_generate(self.model, [GenerateCall(output, self.prompt, self.options) for output in outputs])
        return Timed(encoded - started, time.perf_counter() - encoded, results)


def same(a: Any, b: Any) -> bool:
    return bool(a.sequences_ids == b.sequences_ids and a.scores == b.scores)


def measure(decoding: Decoding, windows: list[np.ndarray], rounds: int) -> dict[str, Any]:
    """Both legs, alternating which goes first; medians, the speed-ups, items equal to alone."""
    legs: dict[str, list[Timed]] = {"single": [], "batch": []}
    differing = 0
    for round_ in range(rounds):
        order = [("single", decoding.one_by_one), ("batch", decoding.batched)]
        results: dict[str, list[Any]] = {}
        for name, leg in order if round_ % 2 == 0 else order[::-1]:
            timed = leg(windows)
            legs[name].append(timed)
            results[name] = timed.results
        differing += sum(not same(a, b) for a, b in zip(results["single"], results["batch"], strict=True))

    def median(name: str, part: str) -> float:
        return statistics.median(getattr(t, part) for t in legs[name])

    single, batch = median("single", "total"), median("batch", "total")
    # Only the encoder calls batched, every generate alone: what file windows get whose prompts differ.
    encode_only = median("batch", "encode") + median("single", "generate")
    return {
        "one_by_one": benchlib.summarize([t.total for t in legs["single"]]),
        "batched": benchlib.summarize([t.total for t in legs["batch"]]),
        "encode_seconds": {"one_by_one": median("single", "encode"), "batched": median("batch", "encode")},
        "generate_seconds": {"one_by_one": median("single", "generate"), "batched": median("batch", "generate")},
        "speedup": single / batch,
        "speedup_encode": median("single", "encode") / median("batch", "encode"),
        "speedup_generate": median("single", "generate") / median("batch", "generate"),
        "speedup_encode_only": single / encode_only,
        "items_differing_from_alone": differing,
        "items_compared": rounds * len(windows),
    }


def measure_short_with_long(decoding: Decoding, model: WhisperModel, rounds: int) -> dict[str, Any]:
    speech = np.tile(decode_audio((DATA_DIR / "speech_multi.wav").read_bytes()), 2)
    short = features(model, speech[: int(SHORT_SECONDS * SAMPLE_RATE)])
    long = features(model, speech[5 * SAMPLE_RATE : 35 * SAMPLE_RATE])
    figures = measure(decoding, [short, long], rounds)
    short_alone = [decoding.one_by_one([short]).total for _ in range(rounds)]
    figures["short_alone"] = benchlib.summarize(short_alone)
    figures["short_latency_in_batch"] = figures["batched"]["median"] / statistics.median(short_alone)
    return figures


def section_limit(model: WhisperModel, args: argparse.Namespace) -> dict[str, Any]:
    decoding = Decoding(model, args.beam_size)
    windows = speech_windows(model, max(args.sizes))
    decoding.one_by_one(windows[:1])  # CTranslate2's first-call costs, outside the figures
    decoding.batched(windows[:2])
    cases: dict[str, Any] = {}
    for size in args.sizes:
        print(f"limit: batch of {size} x 30 s", flush=True)
        cases[f"batch_{size}"] = measure(decoding, windows[:size], args.rounds)
    print(f"limit: {SHORT_SECONDS:g} s + 30 s", flush=True)
    cases["11s+30s"] = measure_short_with_long(decoding, model, args.rounds)
    benchlib.print_table(
        "The limit: one CTranslate2 batch vs one by one (encode + generate, first-window prompt)",
        ["case", "one by one", "batched", "speed-up", "encode", "generate", "encode only", "items differing"],
        [
            [
                name,
                benchlib.fmt_spread(case["one_by_one"], 1, " s"),
                benchlib.fmt_spread(case["batched"], 1, " s"),
                f"{case['speedup']:.2f}x",
                f"{case['speedup_encode']:.2f}x",
                f"{case['speedup_generate']:.2f}x",
                f"{case['speedup_encode_only']:.2f}x",
                f"{case['items_differing_from_alone']}/{case['items_compared']}",
            ]
            for name, case in cases.items()
        ],
    )
    return {"rounds": args.rounds, "cases": cases}


# =========================================================================== audio


@dataclass(frozen=True)
class AudioFile:
    """One file the clients send: its WAV bytes, length, reference text and what it is made of."""

    name: str
    data: bytes
    seconds: float
    reference: str
    pieces: tuple[str, ...]
    gap_seconds: float

    def describe(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "pieces": list(self.pieces),
            "gap_seconds": round(self.gap_seconds, 3),
            "reference_words": len(normalise(self.reference)),
        }


def pcm_of(path: Path) -> np.ndarray:
    with wave.open(str(path)) as handle:
        if (handle.getframerate(), handle.getnchannels(), handle.getsampwidth()) != (SAMPLE_RATE, 1, 2):
            raise SystemExit(f"{path}: expected 16 kHz mono s16le")
        return np.frombuffer(handle.readframes(handle.getnframes()), np.int16)


def wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SAMPLE_RATE)
        handle.writeframes(samples.astype(np.int16).tobytes())
    return buffer.getvalue()


def compose(name: str, pieces: Sequence[str], seconds: float, sources: dict[str, tuple[np.ndarray, str]]) -> AudioFile:
    """``pieces`` one after the other with equal gaps of silence, ``seconds`` long in all."""
    total = round(seconds * SAMPLE_RATE)
    speech = sum(sources[piece][0].shape[0] for piece in pieces)
    gaps = len(pieces) - 1
    gap = (total - speech) // gaps if gaps else 0
    if gap < 0:
        raise ValueError(f"{name}: the pieces are longer than {seconds} s")
    parts: list[np.ndarray] = []
    for index, piece in enumerate(pieces):
        parts.append(sources[piece][0])
        if index < gaps:
            parts.append(np.zeros(gap, np.int16))
    samples = np.concatenate(parts)
    reference = " ".join(sources[piece][1] for piece in pieces)
    return AudioFile(
        name, wav_bytes(samples), samples.shape[0] / SAMPLE_RATE, reference, tuple(pieces), gap / SAMPLE_RATE
    )


def build_files(variants: bool = False) -> dict[str, AudioFile]:
    """The 11 s, 66 s and 5 min files, and with ``variants`` their rotations (``variant_name``)."""
    if not JFK_PATH.exists():
        raise SystemExit(f"no {JFK_PATH}: run 'bash bench/fetch_jfk.sh' first")
    transcripts = json.loads((DATA_DIR / "transcripts.json").read_text())
    sources = {
        "jfk": (pcm_of(JFK_PATH), JFK_REFERENCE),
        "speech_multi": (pcm_of(DATA_DIR / "speech_multi.wav"), transcripts["speech_multi.wav"]),
        "speech_short": (pcm_of(DATA_DIR / "speech_short.wav"), transcripts["speech_short.wav"]),
    }
    files = {name: compose(name, pieces, seconds, sources) for name, (pieces, seconds) in FILE_PIECES.items()}
    for name, (pieces, seconds) in FILE_PIECES.items() if variants else ():
        for turn in range(1, variant_count(name)):  # the --distinct variants: the same pieces, rotated
            variant = variant_name(name, turn)
            files[variant] = compose(variant, [*pieces[turn:], *pieces[:turn]], seconds, sources)
    return files


def variant_name(name: str, turn: int) -> str:
    """``66s.1``: the 66 s file's pieces rotated by one (turn 0 is the file itself)."""
    turn %= variant_count(name)
    return f"{name}.{turn}" if turn else name


def variant_count(name: str) -> int:
    """Distinct rotations of a file: one per piece, at most one per client of a role at 16 clients."""
    return min(len(FILE_PIECES[name][0]), math.ceil(max(LEVELS) / len(ROLE_ORDER)))


def client_lists(clients: int, scale: float, distinct: bool = False) -> list[list[str]]:
    """What each client sends: its role's list, cut to ``scale`` of it (at least one file).
    ``distinct``: the second client of a role sends its files with their pieces rotated by one,
    the third by two, ..., so clients of one role do not send the same audio at the same time."""
    lists = []
    for index in range(clients):
        files = ROLES[ROLE_ORDER[index % len(ROLE_ORDER)]]
        files = files[: max(1, math.ceil(len(files) * scale))]
        if distinct:
            files = [variant_name(name, index // len(ROLE_ORDER)) for name in files]
        lists.append(files)
    return lists


# =========================================================================== requests and scoring


@dataclass
class Request:
    """One transcription as its client saw it (times from this process's perf_counter)."""

    system: str
    file: str
    client: int
    started: float
    ended: float = 0.0
    first_segment: float = float("nan")
    text: str = ""
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def service_request(stub: pb_grpc.InferenceStub, system: str, audio: AudioFile, client: int) -> Request:
    """One Transcribe call with the service's default options, the stream consumed."""
    request = pb.TranscribeRequest(audio=audio.data, options=pb.TranscribeOptions(model_id=MODEL_ID))
    record = Request(system, audio.name, client, time.perf_counter())
    texts: list[str] = []
    try:
        for event in stub.Transcribe(request, timeout=3600):
            if event.WhichOneof("event") == "segment":
                if not texts:
                    record.first_segment = time.perf_counter() - record.started
                texts.append(event.segment.text.strip())
    except grpc.RpcError as error:
        record.error = f"{error.code().name}: {error.details()}"
    record.ended = time.perf_counter()
    record.text = " ".join(texts)
    return record


def words_of(text: str) -> list[str]:
    return normalise(text)


def errors_of(reference: str, hypothesis: str) -> float:
    return word_error_rate(reference, hypothesis) * len(normalise(reference))


def wer_of(requests: Sequence[Request], files: dict[str, AudioFile]) -> float:
    """Word errors over reference words, every request of the list together."""
    done = [r for r in requests if not r.error]
    words = sum(len(normalise(files[r.file].reference)) for r in done)
    return sum(errors_of(files[r.file].reference, r.text) for r in done) / words if words else float("nan")


def differing(requests: Sequence[Request], alone: dict[str, str]) -> tuple[int, int]:
    """(requests whose words differ from the same file's alone, requests compared)."""
    compared = [r for r in requests if not r.error and r.file in alone]
    return sum(words_of(r.text) != words_of(alone[r.file]) for r in compared), len(compared)


def latency_summary(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": benchlib.percentile(values, 50),
        "p95": benchlib.percentile(values, 95),
        "max": max(values),
        "min": min(values),
    }


# =========================================================================== services


class LoadProbe:
    """How many cores other work kept busy while a part of the run went on: the machine's busy
    CPU less this process's and less every service process of this bench (``CpuAudit`` only
    counts children once they have exited, and the services run all along)."""

    def __init__(self, processes: Sequence[benchlib.ServiceProcess]) -> None:
        self.processes = list(processes)
        self.started = time.monotonic()
        self.busy = benchlib.system_busy_seconds()
        self.own = self._own()

    def _own(self) -> float:
        return benchlib.own_cpu_seconds() + sum(p.cpu_seconds() for p in self.processes)

    def result(self) -> dict[str, float]:
        wall = time.monotonic() - self.started
        busy = benchlib.system_busy_seconds() - self.busy
        own = self._own() - self.own
        return {"wall_seconds": wall, "bench_cores": own / wall, "foreign_cores": max(0.0, busy - own) / wall}


@dataclass
class Service:
    name: str
    settings: dict[str, str]
    process: benchlib.ServiceProcess
    metrics_port: int
    channel: grpc.Channel = field(init=False)
    stub: pb_grpc.InferenceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.process.address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.InferenceStub(self.channel)

    @property
    def address(self) -> str:
        return self.process.address

    def cpu_seconds(self) -> float:
        return self.process.cpu_seconds()

    def batch_counts(self) -> dict[str, dict[str, float]]:
        """voxserve_decode_batch_size per op: calls, items, and calls of one item, so far."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        out: dict[str, dict[str, float]] = {}
        pattern = re.compile(r"^voxserve_decode_batch_size_(count|sum|bucket)\{([^}]*)\} (\S+)$")
        for line in text.splitlines():
            match = pattern.match(line)
            if not match:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            entry = out.setdefault(labels.get("op", "?"), {"calls": 0.0, "items": 0.0, "alone": 0.0})
            value = float(match.group(3))
            if match.group(1) == "count":
                entry["calls"] += value
            elif match.group(1) == "sum":
                entry["items"] += value
            elif labels.get("le") == "1.0":
                entry["alone"] += value
        return out

    def stop(self) -> None:
        self.channel.close()
        self.process.stop()


def batch_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per op between two scrapes: calls, items, mean batch size, share of items that shared a batch."""
    out: dict[str, Any] = {}
    for op, values in after.items():
        old = before.get(op, {"calls": 0.0, "items": 0.0, "alone": 0.0})
        calls, items, alone = (values[k] - old[k] for k in ("calls", "items", "alone"))
        out[op] = {
            "calls": calls,
            "items": items,
            "mean_batch": items / calls if calls else float("nan"),
            "items_batched_share": (items - alone) / items if items else float("nan"),
        }
    return out


def start_services(work: Path, wanted: Sequence[str], extra: dict[str, dict[str, str]]) -> tuple[Any, list[Service]]:
    """A model store, then one inference service per configuration (tiny.en and silero-vad
    preloaded, nothing pinned but the VAD), each with its /metrics on a free port."""
    store = benchlib.start_service_process(
        "model_service", ["--data-dir", str(work / "store")], {}, work / "logs" / "store.log", free_port()
    )
    benchlib.wait_model_ready(store.address, MODEL_ID)
    every = {**SERVICES, **extra}
    services = []
    try:
        for name in wanted:
            settings = every[name]
            env = {
                "VOXSERVE_PRELOAD": f"{MODEL_ID},silero-vad",
                "VOXSERVE_PIN": "silero-vad",
                **{env_name(key): value for key, value in settings.items()},
            }
            metrics = free_port()
            args = [
                "--model-store",
                store.address,
                "--cache-dir",
                str(work / f"cache-{name}"),
                "--metrics-port",
                str(metrics),
            ]
            process = benchlib.start_service_process(
                "inference_service", args, env, work / "logs" / f"inference-{name}.log", free_port()
            )
            service = Service(name, settings, process, metrics)
            services.append(service)
            service.stub.LoadModel(pb.LoadModelRequest(model_id=MODEL_ID), timeout=300)
    except BaseException:
        for service in services:
            service.stop()
        store.stop()
        raise
    return store, services


def env_name(key: str) -> str:
    """A setting's environment variable: VOXSERVE_<KEY>, or an upper-case key as it is (MALLOC_*, OMP_*)."""
    return key if ENV_KEY.fullmatch(key) else f"VOXSERVE_{key.upper()}"


def effective_settings(settings: dict[str, str]) -> dict[str, Any]:
    """The batch settings a service ran with: its overrides over InferenceConfig's defaults."""
    defaults = InferenceConfig()
    keys = ("batch_size", "batch_window_ms", "max_running_jobs", "max_queued_jobs", "fast_first_segment")
    return {key: settings.get(key, getattr(defaults, key)) for key in keys}


# =========================================================================== alone


def section_alone(services: list[Service], files: dict[str, AudioFile], reps: int) -> dict[str, Any]:
    """Each file alone through each service; the 11 s and 66 s ones ``reps`` times, alternating."""
    out: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in services}
    for service in services:  # warm-up: the first requests pay first-call costs
        service_request(service.stub, service.name, files["11s"], 0)
    for rep in range(reps):
        order = services[rep % len(services) :] + services[: rep % len(services)]
        for service in order:
            for name in ("11s", "66s"):
                cpu = service.cpu_seconds()
                request = service_request(service.stub, service.name, files[name], 0)
                runs[service.name].append(
                    {"file": name, "rep": rep, "seconds": request.seconds, "cpu_seconds": service.cpu_seconds() - cpu,
                     "first_segment": request.first_segment, "text": request.text, "error": request.error}
                )  # fmt: skip
    for service in services:
        print(f"alone: {service.name} 5 min file", flush=True)
        cpu = service.cpu_seconds()
        request = service_request(service.stub, service.name, files["5min"], 0)
        runs[service.name].append(
            {"file": "5min", "rep": 0, "seconds": request.seconds, "cpu_seconds": service.cpu_seconds() - cpu,
             "first_segment": request.first_segment, "text": request.text, "error": request.error}
        )  # fmt: skip
    for service in services:
        mine = runs[service.name]
        per_file: dict[str, Any] = {}
        for name, audio in files.items():
            these = [r for r in mine if r["file"] == name and not r["error"]]
            if not these:
                continue
            texts = {" ".join(words_of(r["text"])) for r in these}
            per_file[name] = {
                "seconds": benchlib.summarize([r["seconds"] for r in these]),
                "cpu_seconds": benchlib.summarize([r["cpu_seconds"] for r in these]),
                "first_segment": statistics.median(r["first_segment"] for r in these),
                "audio_seconds_per_second": audio.seconds / statistics.median(r["seconds"] for r in these),
                "wer": word_error_rate(audio.reference, these[0]["text"]),
                "distinct_texts": len(texts),
                "text": these[0]["text"],
            }
        # one client: the 11 s and 66 s files of one rep, back to back
        per_rep = [sum(r["seconds"] for r in mine if r["rep"] == rep and r["file"] != "5min") for rep in range(reps)]
        cpu_rep = [
            sum(r["cpu_seconds"] for r in mine if r["rep"] == rep and r["file"] != "5min") for rep in range(reps)
        ]
        out[service.name] = {"files": per_file, "one_client_seconds": per_rep, "one_client_cpu_seconds": cpu_rep}
    base = next((s.name for s in services if s.name == "today_jobs1"), None)
    if base is not None:
        for service in services:
            entry = out[service.name]
            paired = [a / b for a, b in zip(entry["one_client_seconds"], out[base]["one_client_seconds"], strict=True)]
            paired_cpu = [
                a / b for a, b in zip(entry["one_client_cpu_seconds"], out[base]["one_client_cpu_seconds"], strict=True)
            ]
            entry["vs_today_jobs1"] = {
                "wall_ratio_of_medians": statistics.median(entry["one_client_seconds"])
                / statistics.median(out[base]["one_client_seconds"]),
                "wall_paired_median": statistics.median(paired),
                "cpu_ratio_of_medians": statistics.median(entry["one_client_cpu_seconds"])
                / statistics.median(out[base]["one_client_cpu_seconds"]),
                "cpu_paired_median": statistics.median(paired_cpu),
            }
            entry["alone_words_equal_today_jobs1"] = {
                name: words_of(f["text"]) == words_of(out[base]["files"][name]["text"])
                for name, f in entry["files"].items()
                if name in out[base]["files"]
            }
    rows = []
    for name, entry in out.items():
        files_ = entry["files"]
        versus = entry.get("vs_today_jobs1", {})
        rows.append(
            [
                name,
                *[benchlib.fmt_spread(files_[f]["seconds"], 1, " s") if f in files_ else "-" for f in files],
                *[f"{100 * files_[f]['wer']:.1f} %" if f in files_ else "-" for f in files],
                f"{versus.get('wall_paired_median', float('nan')):.3f}",
                f"{versus.get('cpu_paired_median', float('nan')):.3f}",
            ]
        )
    benchlib.print_table(
        f"Alone: each file with nothing else running ({reps} reps of 11 s and 66 s, 1 of 5 min)",
        ["service", *[f"{f} seconds" for f in files], *[f"{f} WER" for f in files], "1 client / today", "CPU / today"],
        rows,
    )
    return out


# =========================================================================== throughput


def run_level(
    service: Service,
    files: dict[str, AudioFile],
    clients: int,
    scale: float,
    probe: list[benchlib.ServiceProcess],
    distinct: bool = False,
) -> dict[str, Any]:
    """``clients`` clients, each sending its list back to back on its own connection."""
    lists = client_lists(clients, scale, distinct)
    channels = [grpc.insecure_channel(service.address, options=CHANNEL_OPTIONS) for _ in range(clients)]
    stubs = [pb_grpc.InferenceStub(channel) for channel in channels]
    for stub in stubs:  # connected first: the timing is of the work, not of TCP set-up
        stub.ListLoadedModels(pb.ListLoadedModelsRequest(), timeout=30)
    requests: list[Request] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        barrier.wait()
        for name in lists[index]:
            record = service_request(stubs[index], service.name, files[name], index)
            with lock:
                requests.append(record)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    cpu = service.cpu_seconds()
    batches = service.batch_counts()
    load = LoadProbe(probe)
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = max(r.ended for r in requests) - started
    cpu = service.cpu_seconds() - cpu
    machine = load.result()
    batch = batch_delta(batches, service.batch_counts())
    for channel in channels:
        channel.close()
    for request in requests:
        request.started -= started
        request.ended -= started
    audio = sum(files[r.file].seconds for r in requests if not r.error)
    return {
        "requests": requests,
        "wall_seconds": wall,
        "audio_seconds": audio,
        "audio_seconds_per_second": audio / wall,
        "service_cpu_seconds_per_audio_second": cpu / audio if audio else float("nan"),
        "machine": machine,
        "batches": batch,
        "lists": {ROLE_ORDER[i % len(ROLE_ORDER)]: len(lists[i]) for i in range(min(clients, len(ROLE_ORDER)))},
    }


def short_while_long(requests: Sequence[Request]) -> list[float]:
    """Latencies of the 11 s requests that ran while a longer request was in flight."""
    longer = [r for r in requests if r.file != "11s" and not r.error]
    return [
        r.seconds
        for r in requests
        if r.file == "11s" and not r.error and any(o.started < r.ended and o.ended > r.started for o in longer)
    ]


@dataclass
class Direct:
    """faster-whisper in this process: sequential ``transcribe``, and BatchedInferencePipeline."""

    model: WhisperModel
    pipeline: BatchedInferencePipeline
    batch_size: int

    def transcribe(self, system: str, audio: AudioFile) -> Request:
        record = Request(system, audio.name, 0, time.perf_counter())
        samples = fw_decode_audio(io.BytesIO(audio.data))
        if system == "fw_sequential":
            segments, _ = self.model.transcribe(samples, beam_size=BEAM_SIZE)
        else:  # as bench_transcribe: without timestamps, the VAD cuts files of 30 s and more into chunks
            segments, _ = self.pipeline.transcribe(
                samples,
                beam_size=BEAM_SIZE,
                batch_size=self.batch_size,
                without_timestamps=True,
                vad_filter=samples.shape[0] >= 30 * SAMPLE_RATE,
            )
        texts = []
        for segment in segments:
            if not texts:
                record.first_segment = time.perf_counter() - record.started
            texts.append(segment.text.strip())
        record.ended = time.perf_counter()
        record.text = " ".join(texts)
        return record

    def run(self, system: str, files: dict[str, AudioFile], names: Sequence[str]) -> dict[str, Any]:
        started = time.perf_counter()
        cpu = benchlib.own_cpu_seconds()
        requests = [self.transcribe(system, files[name]) for name in names]
        wall = time.perf_counter() - started
        audio = sum(files[name].seconds for name in names)
        return {
            "requests": requests,
            "wall_seconds": wall,
            "audio_seconds": audio,
            "audio_seconds_per_second": audio / wall,
            "cpu_seconds_per_audio_second": (benchlib.own_cpu_seconds() - cpu) / audio,
        }


def direct_names(scale: float) -> list[str]:
    """One list of each role, interleaved as the clients would send them."""
    lists = client_lists(len(ROLE_ORDER), scale)
    out: list[str] = []
    for index in range(max(len(x) for x in lists)):
        out.extend(x[index] for x in lists if index < len(x))
    return out


def section_throughput(
    services: list[Service],
    direct: Direct | None,
    files: dict[str, AudioFile],
    levels: Sequence[int],
    scales: dict[int, float],
    direct_scale: float,
    alone_texts: dict[str, dict[str, str]],
    probe: list[benchlib.ServiceProcess],
    on_level: Callable[[dict[str, Any]], None] = lambda partial: None,
    distinct: bool = False,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "levels": list(levels),
        "scales": {str(k): v for k, v in scales.items()},
        "distinct": distinct,
        "systems": {},
    }
    every: dict[str, list[Request]] = {}
    names = direct_names(direct_scale)
    direct_runs: dict[str, list[dict[str, Any]]] = {"fw_sequential": [], "fw_batched": []}

    def run_direct(when: str) -> None:
        if direct is None:
            return
        for system in direct_runs if when == "before" else reversed(list(direct_runs)):
            print(f"throughput: {system} {when}, {len(names)} files", flush=True)
            load = LoadProbe(probe)
            run = direct.run(system, files, names)
            run["when"] = when
            run["machine"] = load.result()
            direct_runs[system].append(run)
            print(
                f"  {system}: {run['audio_seconds_per_second']:.2f} audio-s/s ({run['wall_seconds']:.0f} s)", flush=True
            )

    run_direct("before")
    for position, clients in enumerate(levels):
        order = services[position % len(services) :] + services[: position % len(services)]
        for service in order:
            print(f"throughput: {service.name}, {clients} clients", flush=True)
            level = run_level(service, files, clients, scales.get(clients, 1.0), probe, distinct)
            requests = level.pop("requests")
            every.setdefault(service.name, []).extend(requests)
            short = [r.seconds for r in requests if r.file == "11s" and not r.error]
            diff, compared = differing(requests, alone_texts.get(service.name, {}))
            level.update(
                {
                    "requests": len(requests),
                    "errors": sorted({r.error for r in requests if r.error}),
                    "wer": wer_of(requests, files),
                    "short_latency": latency_summary(short),
                    "short_latency_while_long": latency_summary(short_while_long(requests)),
                    "words_differing_from_alone": diff,
                    "words_compared": compared,
                    "per_request": [
                        [r.file, r.client, round(r.started, 3), round(r.seconds, 3), r.error] for r in requests
                    ],
                }
            )
            system = out["systems"].setdefault(
                service.name, {"settings": effective_settings(service.settings), "levels": {}}
            )
            if clients in system["levels"]:  # a level given twice (--levels 8 8): later trials kept apart
                system.setdefault("repeats", {}).setdefault(clients, []).append(level)
            else:
                system["levels"][clients] = level
            on_level(out)
            batches = level["batches"]
            mean = " ".join(f"{op} {v['mean_batch']:.2f}" for op, v in sorted(batches.items()) if v["calls"])
            print(
                f"  {level['audio_seconds_per_second']:.2f} audio-s/s ({level['wall_seconds']:.0f} s); 11 s p50/p95 "
                f"{level['short_latency'].get('p50', float('nan')):.2f}/{level['short_latency'].get('p95', float('nan')):.2f} s; "
                f"WER {100 * level['wer']:.1f} %; differing {diff}/{compared}; mean batch {mean or '-'}; "
                f"other work {level['machine']['foreign_cores']:.2f} cores",
                flush=True,
            )
    run_direct("after")
    for system, runs in direct_runs.items():
        if not runs:
            continue
        requests = [r for run in runs for r in run["requests"]]
        rates = [run["audio_seconds_per_second"] for run in runs]
        out["systems"][system] = {
            "files": names,
            "runs": [
                {k: v for k, v in run.items() if k != "requests"}
                | {"seconds_per_request": [r.seconds for r in run["requests"]]}
                for run in runs
            ],
            "audio_seconds_per_second": statistics.median(rates),
            "wer": wer_of(requests, files),
            "short_latency": latency_summary([r.seconds for r in requests if r.file == "11s"]),
            "texts_per_file": {
                name: len({" ".join(words_of(r.text)) for r in requests if r.file == name}) for name in files
            },
        }
        every[system] = requests
    for name, requests in every.items():
        out["systems"][name]["wer_all"] = wer_of(requests, files)
        out["systems"][name]["wer_by_file"] = {f: wer_of([r for r in requests if r.file == f], files) for f in files}
        if name in alone_texts:
            diff, compared = differing(requests, alone_texts[name])
            out["systems"][name]["words_differing_from_alone"] = {"requests": diff, "compared": compared}
    print_throughput(out)
    print_trials(out)
    return out


def print_trials(out: dict[str, Any]) -> None:
    """Every trial of a level given more than once, per service, with their mean."""
    for clients in sorted({n for n in out["levels"] if out["levels"].count(n) > 1}):
        for name, system in out["systems"].items():
            if "levels" not in system or clients not in system["levels"]:
                continue
            trials = [system["levels"][clients], *system.get("repeats", {}).get(clients, [])]
            rates = [t["audio_seconds_per_second"] for t in trials]
            listed = " ".join(f"{rate:.2f}" for rate in rates)
            print(f"{clients} clients, {name}: {listed} audio-s/s (mean {statistics.mean(rates):.2f})")


def print_throughput(out: dict[str, Any]) -> None:
    levels = out["levels"]
    systems = out["systems"]
    rows = []
    for name, data in systems.items():
        if "levels" in data:
            rows.append(
                [
                    name,
                    *[
                        f"{data['levels'][n]['audio_seconds_per_second']:.2f}" if n in data["levels"] else "-"
                        for n in levels
                    ],
                ]
            )
        else:
            rates = [run["audio_seconds_per_second"] for run in data["runs"]]
            rows.append(
                [
                    f"{name} (any N)",
                    *[f"{statistics.median(rates):.2f} ({min(rates):.2f}-{max(rates):.2f})"] * len(levels),
                ]
            )
    benchlib.print_table("Throughput, audio seconds per wall second", ["system", *[f"N={n}" for n in levels]], rows)
    rows = []
    for name, data in systems.items():
        if "levels" not in data:
            continue
        cells = []
        for n in levels:
            level = data["levels"].get(n)
            lat = level["short_latency_while_long"] if level else {"n": 0}
            cells.append(f"{lat['p50']:.2f}/{lat['p95']:.2f} ({lat['n']})" if lat.get("n") else "-")
        rows.append([name, *cells])
    benchlib.print_table(
        "11 s requests while a longer one ran: latency p50/p95 s (n)", ["system", *[f"N={n}" for n in levels]], rows
    )
    rows = []
    for name, data in systems.items():
        diff = data.get("words_differing_from_alone", {})
        batch = ""
        if "levels" in data:
            top = data["levels"][max(data["levels"])]["batches"]
            batch = " ".join(
                f"{op} {v['mean_batch']:.2f} ({100 * v['items_batched_share']:.0f} %)"
                for op, v in sorted(top.items())
                if v["calls"]
            )
        rows.append(
            [
                name,
                f"{100 * data['wer_all']:.2f} %",
                " ".join(f"{f} {100 * w:.1f}" for f, w in data["wer_by_file"].items()),
                f"{diff['requests']}/{diff['compared']}" if diff else "-",
                batch or "-",
            ]
        )
    benchlib.print_table(
        "WER (all requests), words differing from alone, mean batch at the top level (share of items batched)",
        ["system", "WER", "WER % by file", "differ from alone", "mean batch"],
        rows,
    )


# =========================================================================== lane


def section_lane(services: list[Service], files: dict[str, AudioFile], most: int, alone_reps: int) -> dict[str, Any]:
    """11 s requests back to back while one 5 min file runs (from 2 s after it started), and the
    same 11 s file alone right before, on each service."""
    out: dict[str, Any] = {}
    for service in services:
        alone_seconds = [
            service_request(service.stub, service.name, files["11s"], 0).seconds for _ in range(alone_reps)
        ]
        long_done = threading.Event()
        holder: dict[str, Request] = {}

        def long_request(
            service: Service = service, done: threading.Event = long_done, holder: dict[str, Request] = holder
        ) -> None:
            holder["long"] = service_request(service.stub, service.name, files["5min"], 0)
            done.set()

        print(f"lane: {service.name}", flush=True)
        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(2.0)
        shorts: list[Request] = []
        while not long_done.is_set() and len(shorts) < most:
            shorts.append(service_request(service.stub, service.name, files["11s"], 1))
        thread.join()
        during = [r.seconds for r in shorts if not r.error and r.ended <= holder["long"].ended + 1e-3]
        reference = statistics.median(alone_seconds)
        summary = latency_summary(during)
        out[service.name] = {
            "short_alone_seconds": alone_seconds,
            "short_alone_median": reference,
            "short_while_long": summary,
            "short_after_long": len(shorts) - len(during),
            "long_seconds": holder["long"].seconds,
            "p95_over_alone": summary.get("p95", float("nan")) / reference,
            "p50_over_alone": summary.get("p50", float("nan")) / reference,
            "errors": sorted({r.error for r in [*shorts, holder["long"]] if r.error}),
        }
    benchlib.print_table(
        "11 s requests while one 5 min file runs (goal: p95 <= 2x alone)",
        ["service", "alone", "p50", "p95", "n", "p95 / alone", "5 min file took"],
        [
            [
                name,
                f"{v['short_alone_median']:.2f} s",
                f"{v['short_while_long'].get('p50', float('nan')):.2f} s",
                f"{v['short_while_long'].get('p95', float('nan')):.2f} s",
                str(v["short_while_long"]["n"]),
                f"{v['p95_over_alone']:.2f}x",
                f"{v['long_seconds']:.1f} s",
            ]
            for name, v in out.items()
        ],
    )
    return out


# =========================================================================== main


def parse_service(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:key=value,key=value`` (keys: InferenceConfig fields, or upper-case environment variables)."""
    name, _, spec = text.partition(":")
    settings = dict(part.split("=", 1) for part in spec.split(",") if part)
    unknown = {key for key in settings if not ENV_KEY.fullmatch(key)} - set(InferenceConfig.__dataclass_fields__)
    if not name or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: NAME:key=value,... with InferenceConfig keys (unknown: {unknown})")
    return name, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--rounds", type=int, default=5, help="limit: alternating rounds per case")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="limit: batch sizes")
    parser.add_argument("--beam-size", type=int, default=5, help="limit: the service's default beam")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--compute-type", default=None, help="default int8 on cpu, float16 on cuda")
    parser.add_argument("--cpu-threads", type=int, default=0, help="0 = CTranslate2's default")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="throughput: concurrent clients")
    parser.add_argument(
        "--scale",
        action="append",
        default=[],
        metavar="N=FRACTION",
        help="throughput: the clients' lists cut to FRACTION at N clients (default 16=0.5; the 5 min file stays whole)",
    )
    parser.add_argument(
        "--direct-scale", type=float, default=1.0, help="throughput: fraction of the direct legs' lists"
    )
    parser.add_argument(
        "--no-direct", action="store_true", help="throughput: leave out the in-process faster-whisper legs"
    )
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="throughput: clients of one role send different audio (the pieces of their files rotated), "
        "not the same files at the same time",
    )
    parser.add_argument("--alone-reps", type=int, default=5, help="alone: reps of the 11 s and 66 s files per service")
    parser.add_argument(
        "--lane-requests", type=int, default=12, help="lane: most 11 s requests while the 5 min file runs"
    )
    parser.add_argument("--lane-alone-reps", type=int, default=3, help="lane: the 11 s file alone first, per service")
    parser.add_argument(
        "--service", action="append", default=[], type=parse_service, metavar="NAME:key=value,...",
        help="another service configuration to measure (e.g. b4:batch_size=4,max_running_jobs=16)",
    )  # fmt: skip
    parser.add_argument(
        "--services",
        nargs="+",
        help="which services run (default: batching today_jobs1 today_jobs2 and every --service)",
    )
    parser.add_argument(
        "--long-role",
        nargs="+",
        choices=("11s", "66s", "5min"),
        help="throughput: what the 'long' clients send instead of the 5 min file (a shorter run on a busy "
        "machine; the lane section keeps the 5 min file)",
    )
    parser.add_argument(
        "--alone-from",
        type=Path,
        help="a result file of an earlier run whose alone section gives the words to compare with "
        "(when this run leaves the alone section out)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: limit 1 round, levels 1 2, short lists")
    benchlib.add_run_options(parser, "bench_batching")
    args = parser.parse_args()
    scales = {16: 0.5}
    for item in args.scale:
        clients, _, fraction = item.partition("=")
        scales[int(clients)] = float(fraction)
    if args.quick:
        args.rounds, args.sizes, args.levels, args.alone_reps, args.lane_requests = 1, [2, 8], [1, 2], 1, 2
        scales = {1: 0.15, 2: 0.15}
        args.direct_scale = 0.15
    if args.long_role:
        ROLES["long"] = list(args.long_role)
    extra = dict(args.service)
    wanted = args.services or [*SERVICES, *extra]
    unknown = [name for name in wanted if name not in SERVICES and name not in extra]
    if unknown:
        parser.error(f"unknown services {unknown}: define them with --service NAME:key=value")
    quiet, audit = benchlib.start_run(args, "bench_batching")
    compute_type = args.compute_type or ("int8" if args.device == "cpu" else "float16")
    payload: dict[str, Any] = {
        "settings": {
            "model": "tiny.en",
            "device": args.device,
            "compute_type": compute_type,
            "cpu_threads": args.cpu_threads,
            "beam_size": args.beam_size,
            "sections": args.sections,
        }
    }
    model: WhisperModel | None = None
    if "limit" in args.sections or ("throughput" in args.sections and not args.no_direct):
        model = benchlib.load_whisper(
            TINY_EN_DIR, device=args.device, compute_type=compute_type, cpu_threads=args.cpu_threads
        )
    loads: dict[str, Any] = {}
    payload["machine_by_section"] = loads

    def checkpoint() -> None:
        """The figures so far, written after each section: a late failure keeps the earlier ones."""
        payload["goals"] = goals(payload)
        benchlib.write_result(args.name, benchlib.rounded(payload), audit, quiet)

    if "limit" in args.sections:
        assert model is not None
        probe = LoadProbe([])
        payload["limit"] = section_limit(model, args)
        loads["limit"] = probe.result()
        checkpoint()
    service_sections = [s for s in args.sections if s != "limit"]
    if service_sections:
        files = build_files(variants=args.distinct)
        payload["audio"] = {name: audio.describe() for name, audio in files.items()}
        payload["roles"] = ROLES
        with benchlib.temp_dir("batching") as work:
            store, services = start_services(work, wanted, extra)
            payload["services"] = {s.name: effective_settings(s.settings) for s in services}
            processes = [store, *(s.process for s in services)]
            try:
                alone: dict[str, Any] = {}
                if "alone" in service_sections:
                    probe = LoadProbe(processes)
                    alone = section_alone(services, files, args.alone_reps)
                    payload["alone"] = alone
                    loads["alone"] = probe.result()
                    checkpoint()
                if not alone and args.alone_from is not None:
                    alone = json.loads(args.alone_from.read_text())["alone"]
                    payload["alone_from"] = {"file": str(args.alone_from), "alone": alone}
                alone_texts = {name: {f: v["text"] for f, v in entry["files"].items()} for name, entry in alone.items()}
                if "throughput" in service_sections:
                    direct = None
                    if model is not None:
                        direct = Direct(model, BatchedInferencePipeline(model), 8)
                        direct.transcribe("fw_sequential", files["11s"])  # warm-up
                        direct.transcribe("fw_batched", files["66s"])
                    probe = LoadProbe(processes)

                    def partial(out: dict[str, Any]) -> None:
                        payload["throughput_so_far"] = out
                        checkpoint()

                    payload["throughput"] = section_throughput(
                        services,
                        direct,
                        files,
                        args.levels,
                        scales,
                        args.direct_scale,
                        alone_texts,
                        processes,
                        partial,
                        args.distinct,
                    )
                    payload.pop("throughput_so_far", None)
                    loads["throughput"] = probe.result()
                    checkpoint()
                if "lane" in service_sections:
                    probe = LoadProbe(processes)
                    payload["lane"] = section_lane(services, files, args.lane_requests, args.lane_alone_reps)
                    loads["lane"] = probe.result()
            finally:
                for service in services:
                    service.stop()
                store.stop()
    payload["goals"] = goals(payload)
    print(json.dumps({"goals": payload["goals"], "machine_by_section": loads}, indent=1, default=str))
    benchlib.write_result(args.name, benchlib.rounded(payload), audit, quiet)


def goals(payload: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, from this run's figures (absent where a section did not run)."""
    out: dict[str, Any] = {}
    limit = payload.get("limit", {}).get("cases", {})
    systems = payload.get("throughput", {}).get("systems", {})
    batching = systems.get("batching", {}).get("levels", {})
    if 8 in batching:
        rate = batching[8]["audio_seconds_per_second"]
        base = systems.get("fw_sequential", {}).get("audio_seconds_per_second")
        out["at_8_clients"] = {"batching": rate}
        for name in ("today_jobs1", "today_jobs2"):
            if 8 in systems.get(name, {}).get("levels", {}):
                out["at_8_clients"][name] = systems[name]["levels"][8]["audio_seconds_per_second"]
        today = out["at_8_clients"].get("today_jobs1")
        if today and "batch_8" in limit:
            # The same share against the service decoding one job at a time at the same level: the
            # in-process sequential leg ran slower than the service alone here (docs/performance.md).
            out["at_8_clients"]["share_of_limit_vs_today_jobs1"] = (rate / today) / limit["batch_8"]["speedup"]
        if base:
            out["at_8_clients"]["fw_sequential"] = base
            out["at_8_clients"]["speedup_over_fw_sequential"] = rate / base
            if "batch_8" in limit:
                out["at_8_clients"]["share_of_limit"] = (rate / base) / limit["batch_8"]["speedup"]
                out["at_8_clients"]["share_of_limit_encode_only"] = (rate / base) / limit["batch_8"][
                    "speedup_encode_only"
                ]
    if "alone" in payload and "batching" in payload["alone"]:
        out["one_client_vs_today"] = payload["alone"]["batching"].get("vs_today_jobs1")
    if "lane" in payload:
        out["short_p95_over_alone_while_5min"] = {name: v["p95_over_alone"] for name, v in payload["lane"].items()}
    if systems:
        out["words_differing_from_alone"] = {
            name: data["words_differing_from_alone"]
            for name, data in systems.items()
            if "words_differing_from_alone" in data
        }
        out["wer"] = {name: data["wer_all"] for name, data in systems.items()}
    return out


if __name__ == "__main__":
    main()
