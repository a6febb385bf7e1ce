"""Where loaded models come from: the model store, over gRPC.

``StoreModelSource.resolve`` returns a local directory holding a READY model: the store's
own directory when it is shared with this node, or a verified copy made with
FetchModelFiles. When the model is not READY and auto-pull is on, it pulls it through the
store and relays the store's progress to the caller.
"""

from __future__ import annotations

import logging
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc

from inference_service.config import InferenceConfig
from inference_service.errors import StoreSourcesFailed
from inference_service.metrics import InferenceMetrics
from inference_service.model_cache import LoadProgress, ModelSpec, ProgressCallback
from inference_service.model_copies import ModelCopies, StagedCopy
from voxserve.modelstore.v1 import modelstore_pb2 as store_pb
from voxserve.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from voxserve_common.errors import FailedPrecondition, InvalidArgument, Unavailable
from voxserve_common.grpc_errors import ERROR_CATEGORY_KEY, error_for_status
from voxserve_common.kinds import ModelKind
from voxserve_common.security import client_security
from voxserve_common.tls import RECONNECT_BACKOFF_OPTIONS, open_channel
from voxserve_common.tracing import trace_metadata

logger = logging.getLogger(__name__)

KIND_NAMES: dict[store_pb.ModelKind, ModelKind] = {
    store_pb.WHISPER: ModelKind.WHISPER,
    store_pb.VAD: ModelKind.VAD,
    store_pb.DEMUCS: ModelKind.DEMUCS,
    store_pb.DIARIZATION: ModelKind.DIARIZATION,
}


def store_answered(error: grpc.RpcError) -> bool:
    """True when the store itself sent the error (its category is in the trailers); False
    when it could not be reached (the transport made the status up)."""
    trailers: Any = error.trailing_metadata() if isinstance(error, grpc.Call) else None
    return any(entry[0] == ERROR_CATEGORY_KEY for entry in trailers or ())


def failure_reason(error: grpc.RpcError) -> str | None:
    """store_unreachable, sources_failed (the labels of voxserve_store_failures_total), or
    None for any other error (the store answered with another status)."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    answered = store_answered(error)
    if code == grpc.StatusCode.UNAVAILABLE and answered:
        return "sources_failed"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not answered:
        return "store_unreachable"
    return None


def _raise_from_rpc(error: grpc.RpcError, action: str) -> NoReturn:
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    reason = failure_reason(error)
    if reason == "sources_failed":
        # The store is up; its hub sources failed. Not the same as the store being down.
        raise StoreSourcesFailed(f"the model store could not download while {action}: {details}") from error
    if reason == "store_unreachable" or code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise Unavailable(
            f"model store unreachable while {action} (after retries): {details}; check that it runs and its address"
        ) from error
    raise error_for_status(code, f"model store: {details}") from error


T = TypeVar("T")
STORE_RETRIES = (0.2, 0.5, 1.0, 2.0)  # seconds before each new attempt, with jitter

# The channel's reconnect backoff is bounded (RECONNECT_BACKOFF_OPTIONS: every 0.25-1 s) so it
# retries within the budget above (at least 2.96 s): with gRPC's default (up to 120 s) the first
# calls after a 30 s store outage failed for 16 s although the store was back.
STORE_CHANNEL_OPTIONS = [*RECONNECT_BACKOFF_OPTIONS, ("grpc.max_receive_message_length", 64 << 20)]


def call_with_retries(call: Callable[[], T]) -> T:
    """Run ``call``, retrying while the store cannot be reached (UNAVAILABLE from the
    transport, not from the store), with exponential backoff and jitter."""
    for delay in (*STORE_RETRIES, None):
        try:
            return call()
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            if delay is None or code != grpc.StatusCode.UNAVAILABLE or store_answered(error):
                raise
            logger.warning("model store unreachable; retrying", extra={"retry_in": delay})
            time.sleep(delay * random.uniform(0.8, 1.2))
    raise AssertionError("unreachable")


class StoreModelSource:
    """Resolves model ids to local directories through the model store."""

    def __init__(
        self, config: InferenceConfig, channel: grpc.Channel | None = None, metrics: InferenceMetrics | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics
        if channel is None:
            # TLS (mutual with a client certificate) and this service's own token, from
            # the store_tls_* and store_token_file settings; plaintext without them.
            tls, token = client_security(
                config.store_tls_ca, config.store_tls_cert, config.store_tls_key, config.store_token_file, "store_tls_*"
            )
            channel = open_channel(config.model_store, tls, token, options=STORE_CHANNEL_OPTIONS)
        self.channel = channel
        self.copies = ModelCopies(config.cache_dir)
        self.stub = store_grpc.ModelStoreStub(self.channel)
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # The last READY description of each model the store gave: while the store is down, a
        # model whose files this node still has (its copy in cache_dir, or the shared directory)
        # is served from them.
        self._known: dict[str, store_pb.Model] = {}

    def close(self) -> None:
        self.channel.close()

    def _reached(self) -> None:
        """A call got an answer from the store (whatever the answer)."""
        if self.metrics is not None:
            self.metrics.store_reachable.set(1)

    def _failed(self, error: grpc.RpcError, action: str) -> NoReturn:
        """Count the failure by reason (down vs. its sources failing), then raise the domain error."""
        if self.metrics is not None:
            reason = failure_reason(error)
            if reason is not None:
                self.metrics.store_failures.labels(reason).inc()
            self.metrics.store_reachable.set(0 if reason == "store_unreachable" else 1)
        _raise_from_rpc(error, action)

    def check_store(self) -> int:
        """One ListModels through the retries: the store's model count; raises Unavailable when it
        cannot be reached (the readiness check at start-up calls this until it succeeds)."""
        try:
            reply: store_pb.ListModelsResponse = call_with_retries(
                lambda: self.stub.ListModels(store_pb.ListModelsRequest(), metadata=trace_metadata(), timeout=10)
            )
        except grpc.RpcError as error:
            self._failed(error, "checking that it answers")
        self._reached()
        return len(reply.models)

    def describe(self, model_id: str) -> store_pb.Model:
        if not model_id:
            raise InvalidArgument("model_id is required")
        try:
            model: store_pb.Model = call_with_retries(
                lambda: self.stub.GetModel(
                    store_pb.GetModelRequest(model_id=model_id), metadata=trace_metadata(), timeout=30
                )
            )
        except grpc.RpcError as error:
            self._failed(error, f"looking up {model_id}")
        self._reached()
        return model

    def kind_of(self, model_id: str) -> ModelKind | None:
        """The model's kind as the store reports it; None for a kind this service does not know."""
        return KIND_NAMES.get(self.describe(model_id).kind)

    def resolve(self, model_id: str, on_progress: ProgressCallback | None = None) -> ModelSpec:
        """A READY model's local directory; pulls it first when allowed.

        While the store cannot be reached, a model this node resolved before is served from
        the files it still has (``_local_spec``). Raises NotFound (unknown id),
        FailedPrecondition (not READY and auto-pull off), Unavailable (store down and no local
        files), DataLoss (fetched bytes do not match).
        """
        try:
            model = self.describe(model_id)
        except Unavailable:
            spec = self._local_spec(model_id)
            if spec is None:
                raise
            logger.warning(
                "model store unreachable; loading the model from the files this node has",
                extra={"model_id": model_id, "path": str(spec.path)},
            )
            return spec
        if model.state != store_pb.READY:
            if not self.config.auto_pull:
                state = store_pb.ModelState.Name(model.state)
                raise FailedPrecondition(
                    f"{model_id} is {state} in the model store and auto_pull is off; pull it first (voxctl models pull {model_id})"
                )
            model = self._pull(model_id, on_progress)
        kind = KIND_NAMES.get(model.kind)
        if kind is None:
            raise InvalidArgument(
                f"model {model_id!r} has kind {model.kind} in the model store; expected one of {', '.join(ModelKind)}"
            )
        path = self._fetch(model, on_progress) if self.config.store_access == "fetch" else self._shared_path(model)
        self._known[model_id] = model
        return ModelSpec(model_id, kind, path, model.size_bytes)

    def _local_spec(self, model_id: str) -> ModelSpec | None:
        """The spec of a model resolved before whose files are still here (a complete copy in
        cache_dir, or the shared directory), without asking the store; None otherwise."""
        model = self._known.get(model_id)
        kind = KIND_NAMES.get(model.kind) if model is not None else None
        if model is None or kind is None:
            return None
        if self.config.store_access == "fetch":
            path = self.copies.target(model.model_id, model.revision)
            if not self.copies.is_current(path, {f.path: (f.size, f.sha256) for f in model.files}):
                return None
        else:
            try:
                path = self._shared_path(model)
            except FailedPrecondition:
                return None
        return ModelSpec(model_id, kind, path, model.size_bytes)

    def _pull(self, model_id: str, on_progress: ProgressCallback | None) -> store_pb.Model:
        logger.info("model not ready in the store; pulling", extra={"model_id": model_id})
        try:
            for event in self.stub.PullModel(store_pb.PullModelRequest(model_id=model_id), metadata=trace_metadata()):
                if on_progress is not None:
                    state = store_pb.ModelState.Name(event.state)
                    on_progress(
                        LoadProgress(model_id, "pulling", event.bytes_done, event.bytes_total, event.message or state)
                    )
        except grpc.RpcError as error:
            self._failed(error, f"pulling {model_id}")
        return self.describe(model_id)

    def _shared_path(self, model: store_pb.Model) -> Path:
        if self.config.shared_store_dir is not None:
            path = self.config.shared_store_dir / "models" / model.model_id
        else:
            path = Path(model.local_path)
        missing = [f.path for f in model.files if not (path / f.path).is_file()]
        if missing:
            raise FailedPrecondition(
                f"{model.model_id} is READY in the store but {path} lacks {missing[:3]} on this node; "
                "share the store's data directory (shared_store_dir) or set store_access=fetch"
            )
        return path

    def _fetch(self, model: store_pb.Model, on_progress: ProgressCallback | None) -> Path:
        """Copy a READY model into cache_dir/<id>/<revision>, verified, fsynced, renamed in whole
        (inference_service/model_copies.py); a complete copy with the right sizes is reused."""
        with self._locks_guard:
            lock = self._fetch_locks.setdefault(model.model_id, threading.Lock())
        with lock:
            target = self.copies.target(model.model_id, model.revision)
            manifest = {f.path: (f.size, f.sha256) for f in model.files}
            if self.copies.is_current(target, manifest):
                return target
            staged = self.copies.stage(model.model_id, manifest)
            try:
                self._copy_files(model, staged, on_progress)
                self.copies.install(staged, target)
            finally:
                staged.close()
                shutil.rmtree(staged.path, ignore_errors=True)
            logger.info("model copied from the store", extra={"model_id": model.model_id, "path": str(target)})
            return target

    def _copy_files(self, model: store_pb.Model, staged: StagedCopy, on_progress: ProgressCallback | None) -> None:
        total = sum(f.size for f in model.files)
        try:
            stream = self.stub.FetchModelFiles(
                store_pb.FetchModelFilesRequest(model_id=model.model_id), metadata=trace_metadata()
            )
            for chunk in stream:
                staged.write(chunk.path, chunk.offset, chunk.data)
                if on_progress is not None:
                    message = f"copying {chunk.path}"
                    on_progress(LoadProgress(model.model_id, "copying", staged.bytes_written, total, message))
        except grpc.RpcError as error:
            self._failed(error, f"copying {model.model_id}")
        staged.finish()
