"""Resemblyzer + spectralcluster diarization, run in its own venv by bench/bench_diarization.py.

The open pipeline of Resemblyzer's diarization demo with Google's spectralcluster library: the
voice encoder's d-vectors of 1.6 s partial windows (4 per second) over the speech webrtcvad
finds (Resemblyzer's own VAD settings), clustered by ``SpectralClusterer`` (the library's
ICASSP 2018 refinement, 1-10 speakers); each 30 ms frame of speech takes the speaker of the nearest window.

    VENV/bin/python bench/diarize_resemblyzer.py IN.json OUT.json

IN.json: {"files": [path of float32 16 kHz mono samples (.npy)], "reps": N}; OUT.json: per file
the turns [start, end, speaker] and the seconds of each rep (the model loaded once before).
"""

from __future__ import annotations

import json
import struct
import sys
import time

import numpy as np
import webrtcvad
from resemblyzer import VoiceEncoder
from resemblyzer.audio import normalize_volume
from spectralcluster import SpectralClusterer, configs

RATE = 16000
FRAME = 0.03  # webrtcvad's frame, as Resemblyzer's trim_long_silences
SMOOTHING = 8  # frames of its moving average (vad_moving_average_width)
PARTIALS_PER_SECOND = 4


def speech_frames(wav: np.ndarray) -> np.ndarray:
    """A boolean per 30 ms frame: speech, as Resemblyzer's VAD (aggressiveness 3, smoothed) says."""
    step = int(FRAME * RATE)
    pcm = struct.pack(f"{len(wav)}h", *(np.round(np.clip(wav, -1, 1) * 32767)).astype(np.int16))
    vad = webrtcvad.Vad(3)
    flags = [vad.is_speech(pcm[i * 2 : (i + step) * 2], RATE) for i in range(0, len(wav) - step + 1, step)]
    padded = np.concatenate([np.zeros(SMOOTHING // 2), np.array(flags, dtype=float), np.zeros(SMOOTHING // 2)])
    smooth = np.convolve(padded, np.ones(SMOOTHING) / SMOOTHING, mode="valid")[: len(flags)]
    return np.round(smooth).astype(bool)


def diarize(encoder: VoiceEncoder, clusterer: SpectralClusterer, samples: np.ndarray) -> list[list[object]]:
    wav = normalize_volume(samples, -30, increase_only=True)
    speech = speech_frames(wav)
    _, partials, splits = encoder.embed_utterance(wav, return_partials=True, rate=PARTIALS_PER_SECOND)
    centres = np.array([(s.start + s.stop) / 2 / RATE for s in splits])
    frame_of = np.minimum((centres / FRAME).astype(int), len(speech) - 1)
    keep = speech[frame_of]
    if keep.sum() < 2:
        return []
    labels = clusterer.predict(partials[keep])
    kept_centres = centres[keep]
    turns: list[list[object]] = []
    for index in np.flatnonzero(speech):
        start = index * FRAME
        speaker = f"S{int(labels[int(np.argmin(np.abs(kept_centres - start - FRAME / 2)))])}"
        if turns and turns[-1][2] == speaker and abs(float(turns[-1][1]) - start) < 1e-6:  # type: ignore[arg-type]
            turns[-1][1] = start + FRAME
        else:
            turns.append([start, start + FRAME, speaker])
    return turns


def main(argv: list[str]) -> int:
    with open(argv[1]) as source:
        request = json.load(source)
    encoder = VoiceEncoder("cpu", verbose=False)
    # The library's configuration for d-vectors of the paper it implements (ICASSP 2018: Gaussian
    # blur, row-wise threshold, symmetrize, diffuse, row-wise normalise), 1-10 speakers; its
    # plain default found one speaker in every file.
    clusterer = SpectralClusterer(
        min_clusters=1, max_clusters=10, refinement_options=configs.icassp2018_refinement_options
    )
    results = []
    for path in request["files"]:
        samples = np.load(path).astype(np.float32)
        seconds = []
        turns: list[list[object]] = []
        for _ in range(request["reps"]):
            started = time.perf_counter()
            turns = diarize(encoder, clusterer, samples)
            seconds.append(time.perf_counter() - started)
        results.append({"turns": turns, "seconds": seconds})
    with open(argv[2], "w") as out:
        json.dump(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
