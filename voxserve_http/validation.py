"""Checks of the strings a client sends (URLs, form fields) before anything uses them."""

from __future__ import annotations

import base64
import re

from voxserve_common.client_strings import check_model_id
from voxserve_common.errors import InvalidArgument
from voxserve_http.errors import bad_request

# Job ids the gateway accepts in URLs and forms: a safe subset of what the inference
# service takes (128 printable characters), so no id can mean a path or a query.
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._:-]{0,126}[A-Za-z0-9])?$")
LANGUAGE_PATTERN = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z]{2,4})?$")
MAX_PROMPT_CHARS = 8192
MAX_SEQUENCE = (1 << 64) - 1


def model_id(value: str, param: str = "id") -> str:
    """A catalog model id (the rule both services share), or 400 naming ``param``."""
    try:
        return check_model_id(value)
    except InvalidArgument as error:
        raise bad_request(str(error), param=param, code="invalid_model_id") from None


def job_id(value: str, param: str = "id") -> str:
    if ".." in value or not JOB_ID_PATTERN.fullmatch(value):
        raise bad_request(
            f"invalid job id {value!r}: use 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-', "
            "starting and ending with a letter or digit",
            param=param,
            code="invalid_job_id",
        )
    return value


def sequence(value: str, param: str) -> int:
    """An event sequence (Last-Event-ID or ?after_sequence=): a whole number >= 0."""
    text = value.strip()
    if not text.isdigit() or int(text) > MAX_SEQUENCE:
        raise bad_request(
            f"{param} must be a whole number >= 0 (the id: of the last event received), not {value[:64]!r}",
            param=param,
            code="invalid_sequence",
        )
    return int(text)


def language(value: str | None) -> str:
    if value is None or not value.strip():
        return ""
    text = value.strip()
    if not LANGUAGE_PATTERN.fullmatch(text):
        raise bad_request(
            f"invalid language {value[:32]!r}: use an ISO 639-1 code such as 'en', 'de' or 'fr'", param="language"
        )
    return text.lower()


def prompt(value: str | None) -> str:
    if value is None:
        return ""
    if len(value) > MAX_PROMPT_CHARS:
        raise bad_request(f"prompt is {len(value)} characters; at most {MAX_PROMPT_CHARS} are taken", param="prompt")
    return value


def boolean(value: str | None, param: str) -> bool:
    if value is None or value.strip() == "":
        return False
    text = value.strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise bad_request(f"{param} must be true or false, not {value[:32]!r}", param=param)


def temperature(value: str | None) -> float | None:
    """OpenAI's temperature, 0-1: passed to the engine (0 = greedy/beam search, above 0 =
    sampling at that temperature only). Absent = the engine's default schedule (0, raised
    by itself when a segment fails the quality checks), as OpenAI does for 0."""
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise bad_request(f"temperature must be a number, not {value[:32]!r}", param="temperature") from None
    if not 0 <= number <= 1:  # NaN fails this too
        raise bad_request(
            f"temperature must be between 0 and 1, got {value[:32]}", param="temperature", code="invalid_temperature"
        )
    return number


MAX_KNOWN_SPEAKERS = 4  # as OpenAI's known_speaker_names[]
MAX_REFERENCE_BYTES = 10 * 1024 * 1024
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?(;[\w.+-]+=[\w.+-]+)*;base64,(?P<data>[A-Za-z0-9+/=\s]*)", re.ASCII)


def known_speakers(names: list[str], references: list[str]) -> list[tuple[str, bytes]]:
    """OpenAI's known_speaker_names[] with their known_speaker_references[] (data URLs of
    audio), as (name, audio bytes); 400 naming the field for a count that differs or a
    reference that is not a base64 data URL. The names and clips are checked again by the
    inference service (length, characters, audio, 0.5-30 s)."""
    if len(names) != len(references):
        raise bad_request(
            f"known_speaker_names[] has {len(names)} entries and known_speaker_references[] {len(references)}; "
            "give one reference clip per name",
            param="known_speaker_references[]",
        )
    if len(names) > MAX_KNOWN_SPEAKERS:
        raise bad_request(
            f"at most {MAX_KNOWN_SPEAKERS} known speakers, got {len(names)}", param="known_speaker_names[]"
        )
    speakers = []
    for index, (name, reference) in enumerate(zip(names, references, strict=True)):
        match = _DATA_URL.fullmatch(reference.strip())
        if match is None or len(reference) > MAX_REFERENCE_BYTES * 4 // 3 + 256:
            raise bad_request(
                f"known_speaker_references[{index}] must be a data URL of audio (data:audio/wav;base64,...)",
                param="known_speaker_references[]",
            )
        try:
            audio = base64.b64decode("".join(match.group("data").split()), validate=True)
        except ValueError:
            raise bad_request(
                f"known_speaker_references[{index}] is not valid base64", param="known_speaker_references[]"
            ) from None
        speakers.append((name.strip(), audio))
    return speakers
