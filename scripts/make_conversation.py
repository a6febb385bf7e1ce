"""Build tests/data/conversation.ogg: real recorded speech of three people joined into a conversation.

python -m scripts.make_conversation SAMPLE_WAV JFK_FLAC [OUT_DIR]

- SAMPLE_WAV: pyannote-audio's tutorials/assets/sample.wav (MIT repository): a real two-person
  conversation whose reference turns (tutorials/assets/sample.rttm) tell where each speaks alone;
- JFK_FLAC: faster-whisper's tests/data/jfk.flac (MIT repository; the speech is public domain).

Turns of 2.5-4.4 s from the solo stretches of the three voices are joined with 0.3 s pauses and
one 0.4 s overlap; the reference (conversation.json: speaker, start, end per turn) follows from
how they were joined. Stretches left out of it make the known-speaker clips
(known_jfk.ogg, known_speaker90.ogg). Written as Opus at 32 kbit/s, 16 kHz mono (~100 kB).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import av
import numpy as np

from inference_service.audio import decode_audio

RATE = 16000
PAUSE = 0.3
# (source, speaker, start, end) in the source's seconds; a negative pause overlaps the previous turn.
TURNS: list[tuple[str, str, float, float, float]] = [
    ("sample", "speaker90", 10.57, 14.45, PAUSE),
    ("sample", "speaker91", 14.75, 17.90, PAUSE),
    ("jfk", "jfk", 0.20, 4.60, PAUSE),
    ("sample", "speaker91", 21.80, 24.80, PAUSE),
    ("sample", "speaker90", 18.60, 21.45, -0.4),
    ("jfk", "jfk", 5.30, 7.80, PAUSE),
    ("sample", "speaker91", 24.80, 27.80, PAUSE),
]
KNOWN = {
    "known_jfk": [("jfk", 8.10, 10.70)],
    "known_speaker90": [("sample", 8.35, 9.90), ("sample", 28.50, 30.00)],
}


def write_opus(path: Path, samples: np.ndarray) -> None:
    with av.open(str(path), "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=48000, layout="mono")
        stream.bit_rate = 32000
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = RATE
        for part in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(part):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def main(argv: list[str]) -> int:
    sources = {
        "sample": decode_audio(Path(argv[1]).read_bytes(), RATE),
        "jfk": decode_audio(Path(argv[2]).read_bytes(), RATE),
    }
    out = Path(argv[3]) if len(argv) > 3 else Path(__file__).resolve().parent.parent / "tests" / "data"

    def cut(source: str, start: float, end: float) -> np.ndarray:
        return sources[source][int(start * RATE) : int(end * RATE)]

    audio = np.zeros(0, dtype=np.float32)
    reference = []
    for source, speaker, start, end, pause in TURNS:
        piece = cut(source, start, end)
        at = len(audio) + int(pause * RATE)
        total = max(len(audio), at + len(piece))
        mixed = np.zeros(total, dtype=np.float32)
        mixed[: len(audio)] += audio
        mixed[at : at + len(piece)] += piece
        audio = mixed
        reference.append({"speaker": speaker, "start": round(at / RATE, 3), "end": round((at + len(piece)) / RATE, 3)})
    write_opus(out / "conversation.ogg", audio)
    (out / "conversation.json").write_text(json.dumps({"turns": reference}, indent=1) + "\n")
    for name, pieces in KNOWN.items():
        write_opus(out / f"{name}.ogg", np.concatenate([cut(*piece) for piece in pieces]))
    print(f"{len(audio) / RATE:.1f} s, {len(reference)} turns -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
