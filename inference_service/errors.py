"""Domain errors of the inference service; the gRPC edge maps their categories to status codes."""

from __future__ import annotations

from voxserve_common.errors import FailedPrecondition, Internal, InvalidArgument, NotFound, ResourceExhausted


class InvalidAudio(InvalidArgument):
    """The audio bytes cannot be decoded, or decode to nothing."""


class AudioTooLarge(ResourceExhausted):
    """The audio is larger than the configured request limit."""

    wire_category = "TooLarge"  # voxserve_common.grpc_errors.TOO_LARGE: retrying cannot help


class InvalidOptions(InvalidArgument):
    """A transcription/separation option is out of range or unsupported by the model."""


class WrongModelKind(InvalidArgument):
    """The model exists but is another kind than the request needs (a VAD model for transcription)."""


class ModelFilesMissing(FailedPrecondition):
    """The model directory lacks a file the engine needs (incomplete or foreign model)."""


class ModelFilesUnloadable(FailedPrecondition):
    """The model's files match the store's manifest (sizes, sha256) but the engine cannot load
    them: copying them again cannot help; the model in the store needs a look."""


class ModelLoadFailed(Internal):
    """Resolving or loading a model failed for a reason that is not a domain error
    (e.g. the files exist but the runtime could not load them)."""


class CacheFull(ResourceExhausted):
    """A model cannot be loaded without evicting a model that is pinned or in use."""

    def __init__(self, message: str, *, model_id: str, estimate_bytes: int, budget_bytes: int, held: list[str]) -> None:
        super().__init__(message)
        self.model_id = model_id
        self.estimate_bytes = estimate_bytes
        self.budget_bytes = budget_bytes
        self.held = held


class ModelInUse(FailedPrecondition):
    """The model has leases held; it can only be unloaded with force."""


class ModelNotLoaded(NotFound):
    """The model is not in the cache."""


class StoreSourcesFailed(FailedPrecondition):
    """The model store answered but could not download the model: every hub source it
    knows failed (the store is up; retrying at once will not help)."""
