"""Live transcription, side by side on the same audio and the same tiny.en files, streamed at real time:
this service's StreamingTranscribe vs WhisperLive 0.10.0 (faster_whisper backend) vs a
LocalAgreement-2 loop written directly on faster-whisper (with Silero VAD endpointing).

Per system: time to first text, final-result latency p50/p90, WER of the final text, CPU
seconds per audio second (of the process doing the work), and how many concurrent
real-time streams it sustains before the lag grows without bound. Also: the time to the
first segment of `Transcribe` of the whole file, plain and with the request's
`fast_first_segment`, alternating on one service, with that service's CPU seconds per call.

WhisperLive runs in its own venv (default /tmp/wlvenv: `python -m venv /tmp/wlvenv;
/tmp/wlvenv/bin/pip install --no-deps whisper-live==0.10.0` plus faster-whisper==1.2.0,
websockets, websocket-client, torch, onnxruntime, av, scipy, soundfile) so that its pins
do not touch the project's venv; its server and a small websocket client of ours run
there as child processes. `--systems` leaves it out when that venv is missing.

Audio: by default 15 espeak-ng sentences made by the bench. `--audio FILE --reference TEXT
--repeat N --gap S` streams a recorded clip repeated N times with S s of silence between;
`--jfk` is the issue's audio: JFK's inaugural line (fetched by bench/fetch_jfk.sh into
.data/bench/jfk.wav) six times with 1 s gaps, 71 s. The clip's speech spans (for the time to
first text and the latency's snap to an utterance end) come from Silero VAD.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import benchlib
from tests.support import TINY_EN_DIR, free_port, sha256, word_error_rate
from voxctl.live import live_requests
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.inference.v1 import inference_pb2_grpc as pb_grpc

RATE = 16000
CHUNK = 0.1  # seconds of audio per message, every system
SENTENCES = (
    "The quarterly report is due at the end of the month.",
    "Please make sure that every team sends its numbers by Thursday.",
    "We moved the planning meeting to the large room on the second floor.",
    "The new printer in the hallway is finally working again.",
    "Remember to lock the back door when you leave in the evening.",
    "Our guests from the head office arrive tomorrow morning at nine.",
    "Lunch will be served in the cafeteria at half past twelve.",
    "The network will be down for maintenance on Saturday night.",
    "If you need a parking permit, ask the front desk.",
    "The training course on safety starts next week.",
    "Please return the laptops you borrowed before the holidays.",
    "We are looking for volunteers to organise the summer party.",
    "The coffee machine on the third floor has been repaired.",
    "Thank you for your patience during the office move.",
    "Have a good weekend, and see you all on Monday.",
)
GAP_SECONDS = 0.9
SNAP = 0.5  # a result end this close to a sentence's real end is measured from that end
JFK_PATH = benchlib.REPO / ".data" / "bench" / "jfk.wav"
JFK_REFERENCE = (
    "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
)


# --------------------------------------------------------------------------- audio


def make_audio(directory: Path, count: int = len(SENTENCES)) -> tuple[Path, list[tuple[float, float, str]]]:
    """espeak-ng sentences (en-us, 150 wpm) with 0.9 s gaps, 16 kHz s16le; the speech span of each."""
    samples: list[np.ndarray] = []
    marks: list[tuple[float, float, str]] = []
    offset = 0
    gap = np.zeros(int(GAP_SECONDS * RATE), np.int16)
    for index, sentence in enumerate(SENTENCES[:count]):
        raw, out = directory / "raw.wav", directory / f"s{index}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), sentence], check=True)
        subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(out)], check=True)
        with wave.open(str(out)) as handle:
            data = np.frombuffer(handle.readframes(handle.getnframes()), np.int16)
        loud = np.nonzero(np.abs(data) > 300)[0]
        marks.append(((offset + loud[0]) / RATE, (offset + loud[-1]) / RATE, sentence))
        samples.append(data)
        offset += data.shape[0]
        if index < count - 1:
            samples.append(gap)
            offset += gap.shape[0]
    path = directory / f"live-{count}.wav"
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(RATE)
        handle.writeframes(np.concatenate(samples).tobytes())
    return path, marks


def clip_pcm(path: Path, directory: Path) -> np.ndarray:
    """The clip as 16 kHz mono s16le samples (sox converts anything else)."""
    with wave.open(str(path)) as handle:
        native = (handle.getframerate(), handle.getnchannels(), handle.getsampwidth()) == (RATE, 1, 2)
        if native:
            return np.frombuffer(handle.readframes(handle.getnframes()), np.int16)
    out = directory / "clip16k.wav"
    subprocess.run(["sox", str(path), "-r", str(RATE), "-c", "1", "-b", "16", str(out)], check=True)
    return np.frombuffer(pcm_of(out), np.int16)


def make_repeated(
    directory: Path, clip: Path, reference: str, repeat: int, gap: float
) -> tuple[Path, list[tuple[float, float, str]]]:
    """``clip`` ``repeat`` times with ``gap`` s of silence between; marks are the clip's speech
    spans (Silero VAD, no padding) in every repetition, the reference text on each repetition's
    last span (the WER reference is the text repeated)."""
    from silero_vad import get_speech_timestamps, load_silero_vad

    data = clip_pcm(clip, directory)
    spans = get_speech_timestamps(
        data.astype(np.float32) / 32768.0, load_silero_vad(onnx=True), sampling_rate=RATE, speech_pad_ms=0
    )
    if not spans:
        raise SystemExit(f"{clip}: Silero VAD finds no speech in it")
    silence = np.zeros(int(gap * RATE), np.int16)
    samples: list[np.ndarray] = []
    marks: list[tuple[float, float, str]] = []
    for index in range(repeat):
        offset = sum(part.shape[0] for part in samples)
        for number, span in enumerate(spans):
            text = reference if number == len(spans) - 1 else ""
            marks.append(((offset + span["start"]) / RATE, (offset + span["end"]) / RATE, text))
        samples.append(data)
        if index < repeat - 1:
            samples.append(silence)
    path = directory / f"clip-{repeat}x.wav"
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(RATE)
        handle.writeframes(np.concatenate(samples).tobytes())
    return path, marks


def reference_of(marks: list[tuple[float, float, str]]) -> str:
    return " ".join(text for *_, text in marks if text)


def pcm_of(path: Path) -> bytes:
    with wave.open(str(path)) as handle:
        return bytes(handle.readframes(handle.getnframes()))


# --------------------------------------------------------------------------- what a stream saw


class Record:
    """One stream as its client saw it: when it started sending, every text received."""

    def __init__(self) -> None:
        self.started = 0.0  # wall time the audio at stream time 0 was sent
        self.items: list[tuple[float, bool, str, float, float]] = []  # (wall, final, text, start, end)
        self.lags: list[tuple[float, float]] = []  # (stream time received, lag) when the system reports it
        self.error = ""

    def add(self, final: bool, text: str, start: float, end: float) -> None:
        self.items.append((time.time(), final, text, start, end))


def sent_at(record: Record, stream_time: float) -> float:
    """Wall time the audio up to ``stream_time`` had been sent (100 ms messages at real time)."""
    return record.started + float(np.ceil(stream_time / CHUNK - 1e-6)) * CHUNK


def analyse(record: Record, marks: list[tuple[float, float, str]]) -> dict[str, Any]:
    ends = [end for _, end, _ in marks]
    texts = [item for item in record.items if item[2].strip()]
    first = texts[0][0] - sent_at(record, marks[0][0]) if texts else float("nan")
    latencies: list[tuple[float, float]] = []  # (stream time, latency)
    finals: list[tuple[float, float, str]] = []  # (stream time of its end, latency, text)
    for wall, final, text, _start, end in texts:
        if not final:
            continue
        nearest = min(ends, key=lambda e: abs(e - end))
        used = nearest if abs(nearest - end) <= SNAP else end
        latencies.append((used, wall - sent_at(record, used)))
        finals.append((used, wall - sent_at(record, used), text))
    # The first text shown for each phrase (draft or final): what a viewer read first.
    first_per_phrase: list[tuple[float, float, str]] = []  # (phrase start, seconds after it, text)
    for phrase_start, _, _ in marks:
        shown = [item for item in texts if item[4] > phrase_start and item[0] >= sent_at(record, phrase_start)]
        if shown:
            first_per_phrase.append((phrase_start, shown[0][0] - sent_at(record, phrase_start), shown[0][2]))
    reference = reference_of(marks)
    hypothesis = " ".join(item[2] for item in texts if item[1])
    values = [lat for _, lat in latencies]
    return {
        "time_to_first_text": first,
        "final_latency": benchlib.summarize(values) if values else {"n": 0},
        "final_p50": benchlib.percentile(values, 50) if values else float("nan"),
        "final_p90": benchlib.percentile(values, 90) if values else float("nan"),
        "wer": word_error_rate(reference, hypothesis),
        "finals": len(values),
        "latencies": latencies,
        "hypothesis": hypothesis,
        "final_results": finals,
        "first_text": texts[0][2] if texts else "",
        "first_text_per_phrase": first_per_phrase,
        "error": record.error,
    }


def sustained(analyses: list[dict[str, Any]], duration: float) -> tuple[bool, dict[str, float]]:
    """Real time is sustained when no stream failed, every final came within 3 s at p90, and
    latency did not grow: the last third's p90 is within 1 s of the first third's."""
    first: list[float] = []
    last: list[float] = []
    for analysis in analyses:
        for when, latency in analysis["latencies"]:
            (first if when < duration / 3 else last if when > 2 * duration / 3 else []).append(latency)
    every = [lat for a in analyses for _, lat in a["latencies"]] or [float("inf")]
    p90_all = benchlib.percentile(every, 90)
    p90_first = benchlib.percentile(first or [float("inf")], 90)
    p90_last = benchlib.percentile(last or [float("inf")], 90)
    ok = all(not a["error"] for a in analyses) and p90_all <= 3.0 and p90_last <= p90_first + 1.0
    figures = {"p50": benchlib.percentile(every, 50), "p90": p90_all}
    return ok, {**figures, "p90_first_third": p90_first, "p90_last_third": p90_last}


# --------------------------------------------------------------------------- this service


def service_stream(address: str, audio: bytes, record: Record) -> None:
    config = pb.StreamingConfig(encoding=pb.LINEAR16, sample_rate_hertz=RATE, interim_results=True)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)

        def requests() -> Any:
            for index, message in enumerate(live_requests(config, audio, 1.0, CHUNK)):
                if index == 1:
                    record.started = time.time()
                yield message

        try:
            for response in stub.StreamingTranscribe(requests(), timeout=900):
                record.lags.append(
                    (
                        response.audio_received_seconds,
                        response.audio_received_seconds - response.audio_processed_seconds,
                    )
                )
                if response.WhichOneof("event") == "result":
                    r = response.result
                    record.add(r.is_final, r.text, r.start, r.end)
        except grpc.RpcError as error:
            record.error = f"{error.code().name}: {error.details()}"


def start_store(work: Path) -> benchlib.ServiceProcess:
    store = benchlib.start_service_process(
        "model_service", ["--data-dir", str(work / "store")], {}, work / "logs" / "store.log", free_port()
    )
    benchlib.wait_model_ready(store.address, "whisper-tiny.en")
    return store


def start_service(
    work: Path, store: str, fast_first_segment: bool = False, settings: dict[str, str] | None = None
) -> benchlib.ServiceProcess:
    """An inference service; ``settings`` (InferenceConfig keys) override the bench's own."""
    env = {
        "VOXSERVE_PRELOAD": "whisper-tiny.en,silero-vad",
        "VOXSERVE_PIN": "",
        "VOXSERVE_LIVE_MAX_STREAMS": "16",
        "VOXSERVE_FAST_FIRST_SEGMENT": "true" if fast_first_segment else "false",
        **{f"VOXSERVE_{key.upper()}": value for key, value in (settings or {}).items()},
    }
    args = ["--model-store", store, "--cache-dir", str(work / "inference-cache")]
    log = work / "logs" / f"inference-fast{int(fast_first_segment)}.log"
    return benchlib.start_service_process("inference_service", args, env, log, free_port())


def first_segment(address: str, data: bytes, fast: bool | None = None) -> tuple[float, float, str]:
    """Transcribe of the whole file: (seconds to the first segment, total seconds, text);
    ``fast`` is the request's fast_first_segment (None: unset, the service's setting)."""
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.InferenceStub(channel)
        options = pb.TranscribeOptions() if fast is None else pb.TranscribeOptions(fast_first_segment=fast)
        request = pb.TranscribeRequest(audio=data, options=options)
        started = time.perf_counter()
        first = float("nan")
        texts: list[str] = []
        for event in stub.Transcribe(request, timeout=300):
            if event.WhichOneof("event") == "segment":
                if not texts:
                    first = time.perf_counter() - started
                texts.append(event.segment.text)
        return first, time.perf_counter() - started, " ".join(texts)


# --------------------------------------------------------------------------- LocalAgreement-2 on faster-whisper


def _norm(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def la2_stream(model: Any, vad_model: Any, audio: np.ndarray, record: Record, min_chunk: float = 1.0) -> None:
    """LocalAgreement-2 (ufal/whisper_streaming's policy, written here from its paper):
    every ``min_chunk`` of new audio re-decode the buffer (beam 5, word timestamps, the
    committed text as prompt), commit the longest prefix two hypotheses agree on (final);
    trim the buffer at a committed segment end past 15 s; Silero VAD endpoint (0.5 s of
    silence) flushes everything and restarts the buffer at the next speech."""
    from silero_vad import VADIterator

    vad = VADIterator(vad_model, sampling_rate=RATE, min_silence_duration_ms=500)
    record.started = time.time()
    buffer_start, consumed, vad_pos = 0.0, 0, 0
    committed: list[tuple[float, float, str]] = []
    previous: list[tuple[float, float, str]] = []
    in_speech, last_decode = False, 0.0

    def decode(upto: int) -> list[tuple[float, float, str]]:
        chunk = audio[int(buffer_start * RATE) : upto]
        prompt = " ".join(w for *_, w in committed)[-200:]
        segments, _ = model.transcribe(
            chunk,
            language="en",
            beam_size=5,
            word_timestamps=True,
            initial_prompt=prompt or None,
            condition_on_previous_text=False,
        )
        words = [
            (buffer_start + w.start, buffer_start + w.end, w.word.strip()) for s in segments for w in s.words or ()
        ]
        done = committed[-1][1] if committed else 0.0
        return [w for w in words if w[0] > done - 0.1]

    def emit(words: list[tuple[float, float, str]]) -> None:
        if words:
            record.add(True, " ".join(w for *_, w in words), words[0][0], words[-1][1])

    while consumed < audio.shape[0]:
        arrived = min(audio.shape[0], int((time.time() - record.started) * RATE))
        while vad_pos + 512 <= arrived:
            event = vad(
                audio[vad_pos : vad_pos + 512].astype(np.float32) / 32768.0
                if audio.dtype != np.float32
                else audio[vad_pos : vad_pos + 512]
            )
            vad_pos += 512
            if event and "start" in event and not in_speech:
                in_speech, buffer_start, committed, previous = True, max(0.0, event["start"] / RATE - 0.2), [], []
                last_decode = buffer_start
            elif event and "end" in event and in_speech:
                in_speech = False
                rest = decode(vad_pos)
                emit(rest)
                committed, previous = [], []
        consumed = arrived
        if in_speech and arrived / RATE - last_decode >= min_chunk:
            last_decode = arrived / RATE
            current = decode(arrived)
            agree = 0
            for a, b in zip(previous, current, strict=False):
                if _norm(a[2]) != _norm(b[2]):
                    break
                agree += 1
            emit(current[:agree])
            committed += current[:agree]
            previous = current[agree:]
            if committed and arrived / RATE - buffer_start > 15:
                buffer_start = committed[-1][1]
        else:
            time.sleep(0.01)
    if in_speech:
        emit(decode(audio.shape[0]))


def la2_worker(audio_path: Path, streams: int, stagger: float) -> None:
    """Child process: ``streams`` LA-2 loops in threads over one model; prints records as JSON."""
    from silero_vad import load_silero_vad

    model = benchlib.load_whisper(TINY_EN_DIR, device="cpu", compute_type="int8")
    audio = np.frombuffer(pcm_of(audio_path), np.int16).astype(np.float32) / 32768.0
    model.transcribe(audio[: RATE * 2], language="en")
    records = [Record() for _ in range(streams)]
    cpu = time.process_time()
    threads = []
    for _index, record in enumerate(records):
        vad_model = load_silero_vad(onnx=True)
        threads.append(threading.Thread(target=la2_stream, args=(model, vad_model, audio, record)))
        threads[-1].start()
        time.sleep(stagger)
    for thread in threads:
        thread.join()
    print(json.dumps({"cpu": time.process_time() - cpu, "records": [vars(r) for r in records]}), flush=True)


# --------------------------------------------------------------------------- WhisperLive

WL_SERVER = """
import sys, logging
logging.basicConfig(level=logging.WARNING)
from whisper_live.server import TranscriptionServer
TranscriptionServer().run("127.0.0.1", int(sys.argv[1]), backend="faster_whisper",
    faster_whisper_custom_model_path=sys.argv[2], single_model=True, max_clients=16, max_connection_time=3600)
"""

WL_CLIENT = """
import json, sys, threading, time, uuid, wave
import numpy as np, websocket
port, path, streams, stagger = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
with wave.open(path) as w:
    audio = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
def run(out):
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}")
    ws.send(json.dumps({"uid": uuid.uuid4().hex, "language": "en", "task": "transcribe", "model": "tiny.en",
                        "use_vad": True, "send_last_n_segments": 10}))
    while "SERVER_READY" not in ws.recv():
        pass
    seen, done = {}, threading.Event()
    def reader():
        while True:
            try:
                message = json.loads(ws.recv())
            except Exception:
                break
            if message.get("message") == "DISCONNECT":
                break
            for seg in message.get("segments", []):
                key = seg["start"]
                final = bool(seg.get("completed"))
                if key in seen and seen[key][0] and seen[key][1] == seg["text"]:
                    continue
                seen[key] = (final, seg["text"])
                out["items"].append((time.time(), final, seg["text"], float(seg["start"]), float(seg["end"])))
        done.set()
    threading.Thread(target=reader, daemon=True).start()
    step = int(0.1 * 16000)
    out["started"] = time.time()
    for i in range(0, len(audio), step):
        time.sleep(max(0.0, out["started"] + i / 16000 - time.time()))
        ws.send(audio[i:i + step].tobytes(), opcode=websocket.ABNF.OPCODE_BINARY)
    ws.send(b"END_OF_AUDIO", opcode=websocket.ABNF.OPCODE_BINARY)
    done.wait(30)
    ws.close()
outs = [{"items": [], "lags": [], "error": "", "started": 0.0} for _ in range(streams)]
threads = []
for out in outs:
    threads.append(threading.Thread(target=run, args=(out,)))
    threads[-1].start()
    time.sleep(stagger)
for t in threads:
    t.join()
print(json.dumps({"records": outs}), flush=True)
"""


def whisperlive_run(venv: Path, port: int, audio_path: Path, streams: int, stagger: float) -> list[Record]:
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", WL_CLIENT, str(port), str(audio_path), str(streams), str(stagger)],
        capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    return [_record(item) for item in json.loads(result.stdout.strip().splitlines()[-1])["records"]]


def _record(data: dict[str, Any]) -> Record:
    record = Record()
    record.started = data["started"]
    record.items = [(float(w), bool(f), str(t), float(a), float(b)) for w, f, t, a, b in data["items"]]
    record.error = data.get("error", "")
    return record


def finals_of_whisperlive(record: Record) -> Record:
    """WhisperLive resends its last segments with every update: keep each completed segment
    once (a resend may move its start by a few frames; the same text more than 1 s away is
    another segment, as in a repeated clip), and count the last draft of the
    stream as final (it stays a draft after END_OF_AUDIO)."""
    out = Record()
    out.started = record.started
    last_end = -1.0
    starts: dict[str, float] = {}  # text -> start of the completed segment kept with it
    for item in record.items:
        wall, final, text, start, end = item
        if final:
            # the same text at another place in the stream is new speech (a clip repeated)
            if abs(start - starts.get(text, -1e9)) < 1.0 or start < last_end - 0.3:
                continue
            starts[text] = start
            last_end = end
        out.items.append(item)
    drafts = [item for item in out.items if not item[1] and item[3] >= last_end - 0.3]
    if drafts:
        wall, _, text, start, end = drafts[-1]
        out.items.append((wall, True, text, start, end))
    return out


# --------------------------------------------------------------------------- legs


def run_streams(start: Callable[[Record], None], streams: int, stagger: float) -> list[Record]:
    records = [Record() for _ in range(streams)]
    threads = []
    for record in records:
        threads.append(threading.Thread(target=start, args=(record,)))
        threads[-1].start()
        time.sleep(stagger)
    for thread in threads:
        thread.join()
    return records


def leg_service(
    address: str, cpu: Callable[[], float], path: Path, streams: int, stagger: float
) -> tuple[list[Record], float]:
    audio = pcm_of(path)
    before = cpu()
    records = run_streams(lambda r: service_stream(address, audio, r), streams, stagger)
    return records, cpu() - before


def leg_la2(path: Path, streams: int, stagger: float) -> tuple[list[Record], float]:
    command = [
        sys.executable,
        "-m",
        "bench.bench_live",
        "--la2-worker",
        str(path),
        "--streams",
        str(streams),
        "--stagger",
        str(stagger),
    ]
    result = subprocess.run(command, cwd=benchlib.REPO, capture_output=True, text=True, check=True, timeout=900)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return [_record(item) for item in data["records"]], float(data["cpu"])


def leg_whisperlive(
    venv: Path, server: subprocess.Popen[Any], port: int, path: Path, streams: int, stagger: float
) -> tuple[list[Record], float]:
    before = benchlib.process_cpu_seconds(server.pid)
    records = [finals_of_whisperlive(r) for r in whisperlive_run(venv, port, path, streams, stagger)]
    return records, benchlib.process_cpu_seconds(server.pid) - before


def stop_process(process: subprocess.Popen[Any]) -> None:
    process.terminate()
    process.wait(10)


def start_whisperlive(venv: Path, log: Path) -> tuple[subprocess.Popen[Any], int]:
    port = free_port()
    handle = open(log, "wb")  # noqa: SIM115 - the child's log
    process = subprocess.Popen(
        [str(venv / "bin" / "python"), "-c", WL_SERVER, str(port), str(TINY_EN_DIR)],
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    import socket

    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        if process.poll() is not None:
            raise RuntimeError(f"WhisperLive server exited: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError("WhisperLive server did not listen within 120 s")


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 sentences, concurrency 1-2")
    parser.add_argument(
        "--systems", nargs="+", default=["service", "whisperlive", "la2"], choices=["service", "whisperlive", "la2"]
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 3, 4, 6])
    parser.add_argument("--concurrency-sentences", type=int, default=7, help="sentences of the concurrency runs")
    parser.add_argument("--stagger", type=float, default=0.37, help="seconds between the starts of concurrent streams")
    parser.add_argument("--whisperlive-venv", type=Path, default=Path("/tmp/wlvenv"))
    parser.add_argument("--audio", type=Path, help="a recorded clip to stream instead of espeak-ng speech")
    parser.add_argument("--reference", help="the clip's text (for the WER; with --audio)")
    parser.add_argument("--repeat", type=int, default=1, help="times the clip is repeated (with --audio)")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds of silence between repetitions")
    parser.add_argument(
        "--concurrency-repeat", type=int, help="repetitions in the concurrency runs (default: half of --repeat)"
    )
    parser.add_argument(
        "--jfk",
        action="store_true",
        help="the issue's audio: --audio .data/bench/jfk.wav (bash bench/fetch_jfk.sh) --repeat 6 --gap 1.0, 71 s",
    )
    parser.add_argument(
        "--service-setting",
        action="append",
        default=[],
        type=lambda text: tuple(text.split("=", 1)),
        metavar="KEY=VALUE",
        help="an InferenceConfig setting of the live service (e.g. live_window_bucket_seconds=0); repeatable",
    )
    parser.add_argument(
        "--no-first-segment", action="store_true", help="leave out the plain vs fast_first_segment Transcribe"
    )
    parser.add_argument("--la2-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=1, help=argparse.SUPPRESS)
    benchlib.add_run_options(parser, "bench_live")
    args = parser.parse_args()
    if args.la2_worker:
        la2_worker(args.la2_worker, args.streams, args.stagger)
        return
    if "whisperlive" in args.systems and not (args.whisperlive_venv / "bin" / "python").exists():
        sys.exit(
            f"no WhisperLive venv at {args.whisperlive_venv}; see this module's docstring, or leave it out with --systems"
        )
    if args.jfk:
        if not JFK_PATH.exists():
            sys.exit(f"no {JFK_PATH}: run 'bash bench/fetch_jfk.sh' first")
        args.audio, args.reference = JFK_PATH, JFK_REFERENCE
        args.repeat, args.gap = 6, 1.0
        args.name = args.name or ("bench_live_jfk_quick" if args.quick else "bench_live_jfk")
    if args.audio is not None and not args.reference:
        sys.exit("--audio needs --reference (the clip's text, for the WER)")
    if args.audio is not None and args.repeat < 1:
        sys.exit("--repeat must be at least 1")
    if args.quick:
        args.concurrency = [1, 2]
    quiet, audit = benchlib.start_run(args, "bench_live")
    with benchlib.temp_dir("live") as work:
        results = run_all(args, work)
    write(args, results, audit, quiet)


def first_segments(
    work: Path, store: str, data: bytes, reps: int = 5
) -> dict[str, list[tuple[float, float, str, float]]]:
    """Transcribe of the whole file, plain and with the request's fast_first_segment, alternating
    on ONE service (same process, cache and threads): (first segment s, total s, text, service
    CPU s) per call. Two services side by side, as before, also measured the other's load."""
    service = start_service(work, store)
    out: dict[str, list[tuple[float, float, str, float]]] = {"plain": [], "fast_first_segment": []}
    try:
        for fast in (False, True):
            first_segment(service.address, data, fast)  # warm-up of both paths
        for rep in range(reps):
            order = list(out) if rep % 2 == 0 else list(reversed(out))
            for name in order:
                cpu = service.cpu_seconds()
                first, total, text = first_segment(service.address, data, name == "fast_first_segment")
                out[name].append((first, total, text, service.cpu_seconds() - cpu))
    finally:
        service.stop()
    return out


def make_audios(
    args: argparse.Namespace, work: Path
) -> tuple[tuple[Path, list[tuple[float, float, str]]], tuple[Path, list[tuple[float, float, str]]], dict[str, Any]]:
    """(the single-stream audio, the concurrency runs' audio, what they are, for the results)."""
    if args.audio is None:
        full = make_audio(work, 5 if args.quick else len(SENTENCES))
        short = make_audio(work, min(args.concurrency_sentences, len(SENTENCES)))
        return full, short, {"kind": "espeak-ng", "label": "espeak-ng speech", "sentences": len(full[1])}
    repeat = min(args.repeat, 2) if args.quick else args.repeat
    short_repeat = args.concurrency_repeat or max(1, (repeat + 1) // 2)
    full = make_repeated(work, args.audio, args.reference, repeat, args.gap)
    short = make_repeated(work, args.audio, args.reference, min(short_repeat, repeat), args.gap)
    label = f"{args.audio.name} x{repeat} with {args.gap:g} s gaps"
    info = {
        "kind": "clip",
        "label": label,
        "file": str(args.audio),
        "sha256": sha256(args.audio),
        "reference": args.reference,
        "repeat": repeat,
        "gap_seconds": args.gap,
        "concurrency_repeat": min(short_repeat, repeat),
        "speech_spans": len(full[1]),
    }
    return full, short, info


def run_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    (full_path, full_marks), (short_path, short_marks), info = make_audios(args, work)
    duration = len(pcm_of(full_path)) / 2 / RATE
    results: dict[str, Any] = {
        "audio_seconds": duration,
        "concurrency_audio_seconds": len(pcm_of(short_path)) / 2 / RATE,
        "audio": info,
        "reference": reference_of(full_marks),
        "sentences": len(full_marks),
        "systems": {},
    }
    legs: dict[str, Callable[[Path, int], tuple[list[Record], float]]] = {}
    stops: list[Callable[[], None]] = []
    try:
        if "service" in args.systems:
            store = start_store(work)
            stops.append(store.stop)
            if not args.no_first_segment:
                results["first_segment"] = first_segments(work, store.address, full_path.read_bytes())
            service = start_service(work, store.address, settings=dict(args.service_setting))
            results["service_settings"] = dict(args.service_setting)
            stops.append(service.stop)
            warm = Record()
            service_stream(service.address, pcm_of(short_path)[: RATE * 2 * 4], warm)
            legs["service"] = lambda p, n: leg_service(service.address, service.cpu_seconds, p, n, args.stagger)
        if "whisperlive" in args.systems:
            server, port = start_whisperlive(args.whisperlive_venv, work / "whisperlive.log")
            stops.append(lambda: stop_process(server))
            whisperlive_run(
                args.whisperlive_venv, port, short_path, 1, 0.0
            )  # warm-up: its first client loads the model
            legs["whisperlive"] = lambda p, n: leg_whisperlive(args.whisperlive_venv, server, port, p, n, args.stagger)
        if "la2" in args.systems:
            legs["la2"] = lambda p, n: leg_la2(p, n, args.stagger)
        for name, leg in legs.items():
            print(f"{name}: one stream of {duration:.1f} s at real time", flush=True)
            records, cpu = leg(full_path, 1)
            single = analyse(records[0], full_marks)
            single["cpu_per_audio_second"] = cpu / duration
            levels = {}
            for streams in args.concurrency:
                print(f"{name}: {streams} concurrent streams", flush=True)
                recs, _ = leg(short_path, streams)
                analyses = [analyse(r, short_marks) for r in recs]
                ok, figures = sustained(analyses, len(pcm_of(short_path)) / 2 / RATE)
                levels[streams] = {
                    "sustained": ok,
                    **figures,
                    "wer": float(np.mean([a["wer"] for a in analyses])),
                    "errors": [a["error"] for a in analyses if a["error"]],
                    # per stream, so that a WER above 0 can be read back to its words
                    "streams": [{"wer": a["wer"], "hypothesis": a["hypothesis"]} for a in analyses],
                }
                if streams > 1 and not ok and name != "service" and streams >= 4:
                    break
            single.pop("latencies")
            results["systems"][name] = {
                "single": single,
                "concurrency": levels,
                "sustains": max([n for n, v in levels.items() if v["sustained"]], default=0),
            }
    finally:
        for stop in stops:
            stop()
    return results


def write(
    args: argparse.Namespace, results: dict[str, Any], audit: benchlib.CpuAudit, quiet: dict[str, float] | None
) -> None:
    rows = []
    for name, data in results["systems"].items():
        single = data["single"]
        rows.append([
            name, f"{single['time_to_first_text']:.2f} s", f"{single['final_p50']:.2f} s", f"{single['final_p90']:.2f} s",
            f"{100 * single['wer']:.1f} %", f"{single['cpu_per_audio_second']:.3f}", str(data["sustains"]),
        ])  # fmt: skip
    benchlib.print_table(
        f"Live, {results['audio_seconds']:.1f} s of {results['audio']['label']} streamed at real time (tiny.en)",
        ["system", "first text", "final p50", "final p90", "WER", "CPU s / audio s", "streams sustained"],
        rows,
    )
    for name, data in results["systems"].items():
        lines = [
            [
                str(n),
                "yes" if v["sustained"] else "no",
                f"{v.get('p50', float('nan')):.2f}",
                f"{v['p90']:.2f}",
                f"{v['p90_first_third']:.2f}",
                f"{v['p90_last_third']:.2f}",
                f"{100 * v['wer']:.1f} %",
                "; ".join(v["errors"])[:60],
            ]
            for n, v in data["concurrency"].items()
        ]
        benchlib.print_table(
            f"{name}: concurrent real-time streams",
            ["streams", "sustained", "final p50", "final p90", "first third", "last third", "WER", "errors"],
            lines,
        )
    if "first_segment" in results:
        rows = []
        for mode, runs in results["first_segment"].items():
            rows.append(
                [
                    mode.strip(),
                    f"{np.median([r[0] for r in runs]):.3f} s",
                    f"{np.median([r[1] for r in runs]):.3f} s",
                    f"{np.median([r[3] for r in runs]):.2f} s" if len(runs[0]) > 3 else "-",
                    f"{100 * word_error_rate(results['reference'], runs[0][2]):.1f} %",
                ]
            )
        benchlib.print_table(
            "Transcribe of the whole file: first segment",
            ["mode", "first segment", "total", "service CPU s", "WER"],
            rows,
        )
    benchlib.write_result(args.name, benchlib.rounded(results, 4), audit, quiet)


if __name__ == "__main__":
    main()
