"""At DEBUG a job logs its phases with their durations, and a live stream its decisions, sparsely."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from model_service.catalog import CatalogEntry
from tests.inference.test_live_stream import MULTI, RATE, pcm, stream
from tests.support import DATA_DIR, TRANSCRIPTS, InferenceHandle, StoreHandle, make_catalog, transcribe, word_error_rate
from tests.tiny_demucs import export_tiny_demucs_bag
from voxserve.modelstore.v1 import modelstore_pb2 as store_pb
from voxserve_common.logs import ContextFilter

WHISPER = "whisper-tiny.en"


class Records(logging.Handler):
    """Every record of the inference service's loggers, with the ids the log context gives
    (the filter the service's own handlers carry)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(ContextFilter("inference"))
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def debug(self, job_id: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno == logging.DEBUG and getattr(r, "job_id", None) == job_id]


@pytest.fixture
def records() -> Iterator[Records]:
    logger = logging.getLogger("inference_service")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def phases_of(records: Records, job_id: str) -> dict[str, logging.LogRecord]:
    """The job's phase records by phase, in the order the phases began."""
    return {r.phase: r for r in records.debug(job_id) if hasattr(r, "phase")}


def test_a_job_logs_each_phase_with_its_duration_at_debug(inference: InferenceHandle, records: Records) -> None:
    events = transcribe(inference, (DATA_DIR / "speech_short.wav").read_bytes(), vad_filter=True)

    job_id = events[0].job_id
    completed = events[-1].completed
    assert word_error_rate(TRANSCRIPTS["speech_short.wav"], completed.text) <= 0.25, completed.text
    phases = phases_of(records, job_id)
    assert list(phases) == ["queued", "decoding", "model_acquire", "vad", "transcribing"], [
        r.getMessage() for r in records.debug(job_id)
    ]
    for name, record in phases.items():
        assert record.model_id == WHISPER, name
        assert isinstance(record.seconds, float) and record.seconds >= 0, name
    # "job queued" at submit, "job started" (with the time queued) once a worker takes it.
    assert [r.getMessage() for r in records.debug(job_id)][:2] == ["job queued", "job started"]
    assert phases["decoding"].audio_seconds == pytest.approx(3.24, abs=0.1)
    assert phases["model_acquire"].cache_hit is False
    assert phases["vad"].speech_spans >= 1
    assert phases["transcribing"].segments == completed.segments >= 1
    # Logged before the job's stream ends (JobManager's "job ended" comes after it: not awaited here).
    mine = [r for r in records.records if getattr(r, "job_id", None) == job_id]
    done = next(r for r in mine if r.getMessage() == "transcription completed")
    assert done.processing_seconds == pytest.approx(completed.processing_seconds, abs=0.01)


def test_separation_is_a_phase_of_its_own(
    start_store: Callable[..., StoreHandle],
    start_inference: Callable[..., InferenceHandle],
    tmp_path: Path,
    records: Records,
) -> None:
    bag_dir = tmp_path / "tiny-demucs"
    yaml_path = export_tiny_demucs_bag(bag_dir)
    catalog = make_catalog()
    catalog["tiny-demucs"] = CatalogEntry(
        "tiny-demucs", "demucs", "test-org/tiny-demucs", "main", ("*.yaml", "*.safetensors"), (yaml_path.name,)
    )
    store = start_store(catalog=catalog, import_embedded=True)
    store.stub.ImportModel(store_pb.ImportModelRequest(model_id="tiny-demucs", source_dir=str(bag_dir)))
    handle = start_inference(store=store)

    events = transcribe(handle, (DATA_DIR / "speech_short.wav").read_bytes(), separate_model_id="tiny-demucs")

    phases = phases_of(records, events[0].job_id)
    assert list(phases)[:4] == ["queued", "decoding", "model_acquire", "separation"]
    assert phases["separation"].separate_model_id == "tiny-demucs"
    assert phases["separation"].seconds >= 0


def test_a_live_stream_logs_its_endpoints_not_its_chunks(inference: InferenceHandle, records: Records) -> None:
    audio = pcm(MULTI)
    responses = stream(inference, audio, 4.0)

    job_id = responses[0].job_id
    debug = [r for r in records.debug(job_id) if r.name.startswith("inference_service.live")]
    messages = [r.getMessage() for r in debug]
    speech = [r for r in responses if r.WhichOneof("event") == "speech_event"]
    finals = [r for r in responses if r.WhichOneof("event") == "result" and r.result.is_final]
    assert messages[0] == "live stream settings" and messages[-1] == "live stream stats"
    assert messages.count("speech started") + messages.count("end of utterance") == len(speech)
    assert messages.count("final result") == len(finals) >= 2
    assert debug[-1].finals == len(finals) and debug[-1].audio_seconds == pytest.approx(len(audio) / 2 / RATE, abs=1e-3)
    assert all(r.model_id == WHISPER for r in debug)
    # Sparse: a handful per utterance, never one per message (0.1 s) or per VAD step (32 ms).
    messages_sent = len(audio) / 2 / RATE / 0.1
    assert len(records.debug(job_id)) < messages_sent / 4, messages
