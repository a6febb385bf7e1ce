"""The engines on real tiny models: tiny.en transcripts, Silero VAD spans, a tiny exported Demucs bag."""

from __future__ import annotations

import inspect
import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from demucs.hf import load_safetensors_model
from demucs.htdemucs import HTDemucs

from inference_service.audio import audio_duration, decode_audio
from inference_service.engines.device import DeviceChoice, choose_device, cuda_available
from inference_service.engines.separation import DemucsSeparator
from inference_service.engines.vad import SileroVadEngine, packaged_silero_model_dir
from inference_service.engines.whisper import Segment, TranscribeOptions, WhisperEngine
from inference_service.errors import InvalidAudio, ModelFilesMissing
from tests.support import DATA_DIR, TINY_EN_DIR, TRANSCRIPTS, normalise, word_error_rate
from tests.tiny_demucs import SEGMENT, SOURCES, export_tiny_demucs_bag
from voxserve_common.errors import Cancelled, FailedPrecondition, InvalidArgument

CPU = DeviceChoice("cpu", "int8")
MAX_WER = 0.35


def test_word_error_rate_counts_edits_per_reference_word() -> None:
    assert word_error_rate("The cat sat.", "the cat, sat") == 0.0
    assert word_error_rate("a b c d", "a x c") == pytest.approx(0.5)  # 1 substitution + 1 deletion
    assert word_error_rate("a b", "a b c d") == pytest.approx(1.0)  # 2 insertions


def load_audio(name: str) -> np.ndarray:
    return decode_audio((DATA_DIR / name).read_bytes())


@pytest.fixture(scope="module")
def whisper() -> Iterator[WhisperEngine]:
    engine = WhisperEngine.load("tiny.en", TINY_EN_DIR, CPU, cpu_threads=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def vad() -> Iterator[SileroVadEngine]:
    engine = SileroVadEngine.load("silero-vad", None, CPU)
    yield engine
    engine.close()


# --- device -------------------------------------------------------------------------------


@pytest.mark.skipif(cuda_available(), reason="this machine has a GPU")
def test_choose_device_on_a_cpu_machine_is_cpu_int8() -> None:
    assert choose_device() == DeviceChoice("cpu", "int8")
    assert choose_device("cpu", "float32") == DeviceChoice("cpu", "float32")
    with pytest.raises(InvalidArgument, match="no CUDA device"):
        choose_device("cuda")


def test_choose_device_rejects_unknown_values() -> None:
    with pytest.raises(InvalidArgument, match="unknown device 'tpu'"):
        choose_device("tpu")
    with pytest.raises(InvalidArgument, match="unknown compute type 'int3'"):
        choose_device("cpu", "int3")


# --- whisper ------------------------------------------------------------------------------


def test_tiny_en_transcribes_short_speech_with_wer_at_most_0_35(whisper: WhisperEngine) -> None:
    audio = load_audio("speech_short.wav")
    duration = audio_duration(audio, 16000)
    info, segments = whisper.transcribe(audio, TranscribeOptions(word_timestamps=True))
    assert info.language == "en"
    assert info.duration == pytest.approx(duration)
    result = list(segments)
    text = " ".join(s.text for s in result)
    assert word_error_rate(TRANSCRIPTS["speech_short.wav"], text) <= MAX_WER, text
    words = [w for s in result for w in s.words]
    assert len(words) >= 5
    for w in words:
        assert 0.0 <= w.start <= w.end <= duration + 0.01, w
        assert 0.0 <= w.probability <= 1.0
    assert normalise("".join(w.word for w in words)) == normalise(text)


def test_tiny_en_transcribes_ogg_with_wer_at_most_0_35(whisper: WhisperEngine) -> None:
    _, segments = whisper.transcribe(load_audio("speech_short.ogg"), TranscribeOptions(beam_size=1))
    text = " ".join(s.text for s in segments)
    assert word_error_rate(TRANSCRIPTS["speech_short.ogg"], text) <= MAX_WER, text


def test_multi_sentence_file_streams_several_segments_lazily_with_wer_at_most_0_35(
    whisper: WhisperEngine,
) -> None:
    info, segments = whisper.transcribe(load_audio("speech_multi.wav"), TranscribeOptions())
    lazy = inspect.isgenerator(segments)
    result = list(segments)
    assert lazy
    assert len(result) >= 3
    assert [s.index for s in result] == list(range(len(result)))
    assert all(a.start <= b.start for a, b in itertools.pairwise(result))
    assert all(0.0 <= s.start < s.end <= info.duration + 0.5 for s in result)
    text = " ".join(s.text for s in result)
    assert word_error_rate(TRANSCRIPTS["speech_multi.wav"], text) <= MAX_WER, text


def test_should_stop_cancels_the_stream_after_the_first_segment(whisper: WhisperEngine) -> None:
    stop = False
    polls = 0

    def should_stop() -> bool:
        nonlocal polls
        polls += 1
        return stop

    _, segments = whisper.transcribe(load_audio("speech_multi.wav"), TranscribeOptions(beam_size=1), should_stop)
    assert polls == 0  # nothing decoded until the caller pulls
    first = next(segments)
    assert isinstance(first, Segment) and first.index == 0 and first.text
    stop = True
    with pytest.raises(Cancelled, match="after 1 segment"):
        next(segments)
    with pytest.raises(StopIteration):
        next(segments)


def test_should_stop_is_checked_before_the_first_segment(whisper: WhisperEngine) -> None:
    _, segments = whisper.transcribe(load_audio("speech_short.wav"), TranscribeOptions(), lambda: True)
    with pytest.raises(Cancelled, match="after 0 segment"):
        next(segments)


def test_silence_with_vad_filter_yields_no_text(whisper: WhisperEngine) -> None:
    info, segments = whisper.transcribe(load_audio("silence.wav"), TranscribeOptions(vad_filter=True))
    assert info.duration == pytest.approx(5.0)
    assert [s.text for s in segments if s.text.strip()] == []


def test_batched_pipeline_transcribes_multi_sentence_file_with_wer_at_most_0_35(whisper: WhisperEngine) -> None:
    _, segments = whisper.transcribe_batched(load_audio("speech_multi.wav"), TranscribeOptions(), batch_size=4)
    text = " ".join(s.text for s in segments)
    assert word_error_rate(TRANSCRIPTS["speech_multi.wav"], text) <= MAX_WER, text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (TranscribeOptions(task="translate"), "English-only and cannot translate"),
        (TranscribeOptions(language="de"), "English-only and cannot transcribe language 'de'"),
        (TranscribeOptions(language="klingon"), "unknown language code 'klingon'"),
        (TranscribeOptions(task="summarize"), "unknown task 'summarize'"),
        (TranscribeOptions(beam_size=0), "beam_size must be between 1 and 20, got 0"),
        (TranscribeOptions(beam_size=21), "beam_size must be between 1 and 20, got 21"),
    ],
)
def test_bad_options_are_invalid_argument_before_any_decoding(
    whisper: WhisperEngine, options: TranscribeOptions, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        whisper.transcribe(load_audio("speech_short.wav"), options)


def test_english_and_empty_strings_are_accepted_on_english_only_model(whisper: WhisperEngine) -> None:
    opts = whisper.validate(TranscribeOptions(language="EN", initial_prompt="", hotwords=""))
    assert (opts.language, opts.initial_prompt, opts.hotwords) == ("en", None, None)


def test_stereo_audio_is_invalid_for_whisper(whisper: WhisperEngine) -> None:
    with pytest.raises(InvalidAudio, match="16 kHz mono"):
        whisper.transcribe(np.zeros((2, 16000), np.float32), TranscribeOptions())


def test_whisper_load_without_model_files_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFilesMissing, match=r"model\.bin, tokenizer\.json missing"):
        WhisperEngine.load("broken", tmp_path, CPU)


def test_closed_whisper_engine_refuses_work() -> None:
    engine = WhisperEngine.load("tiny.en", TINY_EN_DIR, CPU, cpu_threads=1)
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(FailedPrecondition, match="closed"):
        engine.transcribe(load_audio("speech_short.wav"), TranscribeOptions())


# --- silero VAD ---------------------------------------------------------------------------


def test_vad_finds_speech_across_the_short_sentence(vad: SileroVadEngine) -> None:
    audio = load_audio("speech_short.wav")
    duration = audio_duration(audio, 16000)
    spans = vad.speech_timestamps(audio)
    assert spans
    assert spans[0][0] < 0.5
    assert duration - 1.0 < spans[-1][1] <= duration
    assert all(start < end for start, end in spans)


def test_vad_finds_no_speech_in_silence(vad: SileroVadEngine) -> None:
    assert vad.speech_timestamps(load_audio("silence.wav")) == []


def test_vad_separates_the_sentences_of_the_multi_file(vad: SileroVadEngine) -> None:
    spans = vad.speech_timestamps(load_audio("speech_multi.wav"))
    long_pauses = [b[0] - a[1] for a, b in itertools.pairwise(spans) if b[0] - a[1] > 0.7]
    assert len(long_pauses) >= 5  # six sentences, ~1 s apart


def test_vad_loads_the_first_onnx_under_a_model_dir(tmp_path: Path) -> None:
    (tmp_path / "onnx").mkdir()
    shutil.copy(packaged_silero_model_dir() / "silero_vad.onnx", tmp_path / "onnx" / "model.onnx")
    engine = SileroVadEngine.load("onnx-community/silero-vad", tmp_path, CPU)
    assert engine.path == tmp_path / "onnx" / "model.onnx"
    assert engine.speech_timestamps(load_audio("speech_short.wav"))
    engine.close()
    with pytest.raises(FailedPrecondition):
        engine.speech_timestamps(load_audio("speech_short.wav"))


def test_vad_load_from_a_dir_without_onnx_is_model_files_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesMissing, match=r"no \*\.onnx file"):
        SileroVadEngine.load("empty", tmp_path, CPU)


def test_loading_the_vad_keeps_torch_thread_count() -> None:
    """In a fresh interpreter, because silero_vad's import side effect happens only once."""
    code = (
        "import torch\n"
        "torch.set_num_threads(3)\n"
        "from inference_service.engines.device import DeviceChoice\n"
        "from inference_service.engines.vad import SileroVadEngine\n"
        "SileroVadEngine.load('silero', None, DeviceChoice('cpu', 'int8'))\n"
        "import silero_vad\n"
        "print(torch.get_num_threads())\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert out.stdout.strip() == "3"


# --- demucs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_demucs_bag(tmp_path_factory.mktemp("demucs"))


@pytest.fixture(scope="module")
def separator(tiny_bag: Path) -> Iterator[DemucsSeparator]:
    engine = DemucsSeparator.load("tiny_htdemucs", tiny_bag.parent, CPU)
    yield engine
    engine.close()


def test_tiny_bag_round_trips_through_demucs_own_loader(tiny_bag: Path) -> None:
    (weights,) = tiny_bag.parent.glob("*.safetensors")
    assert tiny_bag.read_text() == f"models:\n- {weights.stem}\n"
    model = load_safetensors_model(weights)
    assert isinstance(model, HTDemucs)
    assert model.sources == ["drums", "bass", "other", "vocals"]
    assert model.segment == SEGMENT and isinstance(model.segment, Fraction)
    torch.manual_seed(0)  # the export's seed: the same random weights
    expected = HTDemucs(sources=SOURCES, channels=4, dconv_comp=4, segment=SEGMENT).state_dict()
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_separator_returns_finite_vocals_of_the_input_shape(separator: DemucsSeparator) -> None:
    assert (separator.samplerate, separator.audio_channels) == (44100, 2)
    assert separator.sources == ["drums", "bass", "other", "vocals"]
    mix = separator.decode_for_model((DATA_DIR / "speech_short.ogg").read_bytes())[:, : int(1.5 * 44100)]
    vocals = separator.separate_vocals(mix)
    assert vocals.shape == mix.shape and vocals.dtype == np.float32
    assert np.isfinite(vocals).all()
    for_whisper = separator.vocals_for_whisper(vocals)
    assert for_whisper.ndim == 1 and for_whisper.shape[0] == pytest.approx(1.5 * 16000, abs=20)


def test_separator_checks_should_stop_before_running(separator: DemucsSeparator) -> None:
    with pytest.raises(Cancelled):
        separator.separate_vocals(np.zeros((2, 44100), np.float32), should_stop=lambda: True)


def test_separator_rejects_mono_input(separator: DemucsSeparator) -> None:
    with pytest.raises(InvalidAudio, match=r"needs \(2, samples\) audio at 44100 Hz"):
        separator.separate_vocals(np.zeros((1, 44100), np.float32))


def test_separator_needs_a_name_when_the_dir_has_two_bags(tiny_bag: Path, tmp_path: Path) -> None:
    for f in tiny_bag.parent.glob("*.*"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(tiny_bag, tmp_path / "other_bag.yaml")
    with pytest.raises(ModelFilesMissing, match="exactly one"):
        DemucsSeparator.load("two", tmp_path, CPU)
    assert DemucsSeparator.load("two", tmp_path, CPU, name="other_bag").sources[-1] == "vocals"


def test_separator_load_names_a_missing_weights_file(tmp_path: Path) -> None:
    (tmp_path / "bag.yaml").write_text("models: [deadbeef]\n")
    with pytest.raises(ModelFilesMissing, match=r"deadbeef\.safetensors"):
        DemucsSeparator.load("bag", tmp_path, CPU)
