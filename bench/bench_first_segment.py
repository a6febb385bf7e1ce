"""`fast_first_segment` on a corpus of real and synthetic speech: time to the first segment,
total time and the words (WER against a reference, and words changed against the plain path)
of `Transcribe` with the option off and on, alternating on one service.

The corpus (what issue 16 asks the default to be decided on):
- tests/data: speech_short.wav, speech_multi.wav (espeak-ng);
- JFK's inaugural line alone and x6 with 1 s gaps (`bash bench/fetch_jfk.sh`);
- faster-whisper's test audio (`--fw-dir DIR` holding its tests/data: jfk.flac,
  stereo_diarization.wav, hotwords.mp3), when given;
- speech_multi.wav after 8 s of synthesized music, and after 8 s of brown noise (sox).

    python -m bench.bench_first_segment [--reps 3] [--fw-dir .data/bench/fw] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

from bench import benchlib
from bench.bench_live import JFK_PATH, JFK_REFERENCE, first_segment, make_repeated, start_service, start_store
from tests.support import DATA_DIR, TRANSCRIPTS, word_error_rate

RATE = 16000
# faster-whisper's own test expectations (tests/test_transcribe.py) for its two English clips.
FW_REFERENCES = {
    "jfk.flac": JFK_REFERENCE,
    "stereo_diarization.wav": "He began a confused complaint against the wizard, who had vanished behind the "
    "curtain on the left. The horizon seems extremely distant.",
    "hotwords.mp3": None,  # no reference text published: only compared with the plain path
}


def sox(*args: str) -> None:
    subprocess.run(["sox", *args], check=True, capture_output=True)


def with_lead_in(work: Path, kind: str, speech: Path, seconds: float = 8.0) -> Path:
    """``seconds`` of synthesized music (plucked chords) or brown noise, then ``speech``."""
    lead = work / f"lead-{kind}.wav"
    if kind == "music":
        chords = ["C4", "E4", "G4"], ["A3", "C4", "E4"], ["F3", "A3", "C4"], ["G3", "B3", "D4"]
        parts = []
        for index, notes in enumerate(chords):
            part = work / f"chord{index}.wav"
            synth = [arg for note in notes for arg in ("pluck", note)]
            sox(
                "-n", "-r", str(RATE), "-c", "1", "-b", "16", str(part), "synth", str(seconds / 4), *synth, "gain", "-8"
            )
            parts.append(str(part))
        sox(*parts, str(lead))
    else:
        sox("-n", "-r", str(RATE), "-c", "1", "-b", "16", str(lead), "synth", str(seconds), "brownnoise", "gain", "-12")
    speech16 = work / f"{speech.stem}-16k.wav"
    sox(str(speech), "-r", str(RATE), "-c", "1", "-b", "16", str(speech16))
    out = work / f"{kind}-then-{speech.stem}.wav"
    sox(str(lead), str(speech16), str(out))
    return out


def corpus(work: Path, fw_dir: Path | None, quick: bool) -> list[tuple[str, Path, str | None]]:
    multi = DATA_DIR / "speech_multi.wav"
    items: list[tuple[str, Path, str | None]] = [
        ("speech_short.wav (espeak, 3 s)", DATA_DIR / "speech_short.wav", TRANSCRIPTS["speech_short.wav"]),
        ("speech_multi.wav (espeak, 25 s)", multi, TRANSCRIPTS["speech_multi.wav"]),
        ("music 8 s, then speech_multi", with_lead_in(work, "music", multi), TRANSCRIPTS["speech_multi.wav"]),
        ("brown noise 8 s, then speech_multi", with_lead_in(work, "noise", multi), TRANSCRIPTS["speech_multi.wav"]),
    ]
    if JFK_PATH.exists():
        items.append(("JFK (11 s)", JFK_PATH, JFK_REFERENCE))
        if not quick:
            path, _ = make_repeated(work, JFK_PATH, JFK_REFERENCE, 6, 1.0)
            items.append(("JFK x6, 1 s gaps (71 s)", path, " ".join([JFK_REFERENCE] * 6)))
    if fw_dir is not None:
        for name, reference in FW_REFERENCES.items():
            if (fw_dir / name).exists():
                items.append((f"faster-whisper {name}", fw_dir / name, reference))
    return items


def duration(path: Path) -> float:
    from inference_service.audio import decode_audio

    return float(decode_audio(path.read_bytes(), RATE).shape[0] / RATE)


def words_changed(plain: str, other: str) -> float:
    """Word error rate of ``other`` against ``plain``: how much the option changes the words."""
    return word_error_rate(plain, other) if plain.strip() else float(bool(other.strip()))


def measure(address: str, path: Path, reps: int) -> dict[str, list[tuple[float, float, str]]]:
    data = path.read_bytes()
    runs: dict[str, list[tuple[float, float, str]]] = {"plain": [], "fast": []}
    for fast in (False, True):
        first_segment(address, data, fast)  # warm-up of both paths on this file
    for rep in range(reps):
        for name in ("plain", "fast") if rep % 2 == 0 else ("fast", "plain"):
            runs[name].append(first_segment(address, data, name == "fast"))
    return runs


def summarize(
    label: str, path: Path, reference: str | None, runs: dict[str, list[tuple[float, float, str]]]
) -> dict[str, Any]:
    row: dict[str, Any] = {"file": label, "seconds": round(duration(path), 1)}
    plain_text = runs["plain"][0][2]
    for name, values in runs.items():
        texts = {text for _, _, text in values}
        row[name] = {
            "first_segment_s": round(statistics.median(v[0] for v in values), 3),
            "total_s": round(statistics.median(v[1] for v in values), 3),
            "wer": None if reference is None else round(word_error_rate(reference, values[0][2]), 4),
            "words_changed_vs_plain": round(words_changed(plain_text, values[0][2]), 4),
            "same_text_every_run": len(texts) == 1,
            "text": values[0][2],
        }
    return row


def print_rows(rows: list[dict[str, Any]]) -> None:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    benchlib.print_table(
        "fast_first_segment off vs on (medians)",
        ["file", "s", "first seg off", "first seg on", "total off", "total on", "WER off", "WER on", "words changed"],
        [
            [
                r["file"],
                r["seconds"],
                f"{r['plain']['first_segment_s']:.2f} s",
                f"{r['fast']['first_segment_s']:.2f} s",
                f"{r['plain']['total_s']:.2f} s",
                f"{r['fast']['total_s']:.2f} s",
                pct(r["plain"]["wer"]),
                pct(r["fast"]["wer"]),
                pct(r["fast"]["words_changed_vs_plain"]),
            ]
            for r in rows
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="calls per file and mode (alternating)")
    parser.add_argument(
        "--fw-dir", type=Path, help="faster-whisper's tests/data (jfk.flac, stereo_diarization.wav, hotwords.mp3)"
    )
    parser.add_argument("--quick", action="store_true", help="1 rep, no JFK x6")
    benchlib.add_run_options(parser, "bench_first_segment")
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    quiet, audit = benchlib.start_run(args, "bench_first_segment")
    rows: list[dict[str, Any]] = []
    with benchlib.temp_dir("first-segment") as work:
        store = start_store(work)
        try:
            service = start_service(work, store.address)
            try:
                for label, path, reference in corpus(work, args.fw_dir, args.quick):
                    rows.append(summarize(label, path, reference, measure(service.address, path, reps)))
                    print(json.dumps({k: rows[-1][k] for k in ("file", "seconds")}), flush=True)
            finally:
                service.stop()
        finally:
            store.stop()
    print_rows(rows)
    with_reference = [r for r in rows if r["plain"]["wer"] is not None]
    totals = {name: round(statistics.mean(r[name]["wer"] for r in with_reference), 4) for name in ("plain", "fast")}
    benchlib.write_result(args.name, {"reps": reps, "mean_wer": totals, "files": rows}, audit, quiet)


if __name__ == "__main__":
    main()
