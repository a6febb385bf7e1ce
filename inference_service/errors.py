"""Domain errors of the inference service; the gRPC edge maps their categories to status codes."""

from __future__ import annotations

from voxserve_common.errors import FailedPrecondition, Internal, InvalidArgument, ResourceExhausted


class InvalidAudio(InvalidArgument):
    """The audio bytes cannot be decoded, or decode to nothing."""


class AudioTooLarge(ResourceExhausted):
    """The audio is larger than the configured request limit."""


class InvalidOptions(InvalidArgument):
    """A transcription/separation option is out of range or unsupported by the model."""


class WrongModelKind(InvalidArgument):
    """A model of one kind (e.g. vad) was named where another kind (e.g. whisper) is needed."""


class ModelFilesMissing(FailedPrecondition):
    """The model directory lacks a file the engine needs (incomplete or foreign model)."""


class ModelLoadFailed(Internal):
    """The model files exist but the runtime could not load them."""
