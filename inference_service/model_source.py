"""Where loaded models come from: the model store, over gRPC.

``StoreModelSource.resolve`` returns a local directory holding a READY model: the store's
own directory when it is shared with this node, or a verified copy made with
FetchModelFiles. When the model is not READY and auto-pull is on, it pulls it through the
store and relays the store's progress to the caller.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar

import grpc

from inference_service.config import InferenceConfig
from inference_service.errors import StoreSourcesFailed
from inference_service.metrics import InferenceMetrics
from inference_service.model_cache import LoadProgress, ModelSpec, ProgressCallback
from voxserve.modelstore.v1 import modelstore_pb2 as store_pb
from voxserve.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from voxserve_common.errors import DataLoss, FailedPrecondition, InvalidArgument, Unavailable
from voxserve_common.grpc_errors import ERROR_CATEGORY_KEY, error_for_status
from voxserve_common.kinds import ModelKind
from voxserve_common.security import client_security
from voxserve_common.tls import open_channel
from voxserve_common.tracing import trace_metadata

logger = logging.getLogger(__name__)

KIND_NAMES: dict[store_pb.ModelKind, ModelKind] = {
    store_pb.WHISPER: ModelKind.WHISPER,
    store_pb.VAD: ModelKind.VAD,
    store_pb.DEMUCS: ModelKind.DEMUCS,
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
            channel = open_channel(
                config.model_store, tls, token, options=[("grpc.max_receive_message_length", 64 << 20)]
            )
        self.channel = channel
        self.stub = store_grpc.ModelStoreStub(self.channel)
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

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

        Raises NotFound (unknown id), FailedPrecondition (not READY and auto-pull off),
        Unavailable (store down), DataLoss (fetched bytes do not match).
        """
        model = self.describe(model_id)
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
        """Copy a READY model into cache_dir/<id>/<revision>, verified, renamed in whole."""
        with self._locks_guard:
            lock = self._fetch_locks.setdefault(model.model_id, threading.Lock())
        with lock:
            revision = "".join(c for c in (model.revision or "local") if c.isalnum())[:40] or "local"
            target = self.config.cache_dir / model.model_id / revision
            manifest = {f.path: [f.size, f.sha256] for f in model.files}
            marker = target / ".voxserve-manifest.json"
            if marker.is_file():
                try:
                    if json.loads(marker.read_text()) == manifest:
                        return target
                except ValueError:
                    pass
            staging = self.config.cache_dir / ".staging" / f"{model.model_id}-{uuid.uuid4().hex[:8]}"
            staging.mkdir(parents=True)
            try:
                self._copy_files(model, staging, on_progress)
                marker_tmp = staging / ".voxserve-manifest.json"
                marker_tmp.write_text(json.dumps(manifest, sort_keys=True))
                if target.exists():
                    shutil.rmtree(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            logger.info("model copied from the store", extra={"model_id": model.model_id, "path": str(target)})
            return target

    def _copy_files(self, model: store_pb.Model, staging: Path, on_progress: ProgressCallback | None) -> None:
        expected = {f.path: f for f in model.files}
        hashes: dict[str, hashlib._Hash] = {}
        sizes: dict[str, int] = {}
        handles: dict[str, BinaryIO] = {}
        done = 0
        total = sum(f.size for f in model.files)
        root = staging.resolve()
        try:
            stream = self.stub.FetchModelFiles(
                store_pb.FetchModelFilesRequest(model_id=model.model_id), metadata=trace_metadata()
            )
            for chunk in stream:
                if chunk.path not in expected:
                    raise DataLoss(f"store sent unexpected file {chunk.path!r} for {model.model_id}")
                path = (root / chunk.path).resolve()
                if not path.is_relative_to(root):
                    raise DataLoss(f"store sent unsafe file name {chunk.path!r}")
                if chunk.path not in handles:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    handles[chunk.path] = open(path, "wb")  # noqa: SIM115 - closed below
                    hashes[chunk.path] = hashlib.sha256()
                    sizes[chunk.path] = 0
                if chunk.offset != sizes[chunk.path]:
                    raise DataLoss(f"{chunk.path}: chunk at offset {chunk.offset}, expected {sizes[chunk.path]}")
                handles[chunk.path].write(chunk.data)
                hashes[chunk.path].update(chunk.data)
                sizes[chunk.path] += len(chunk.data)
                done += len(chunk.data)
                if on_progress is not None:
                    on_progress(LoadProgress(model.model_id, "copying", done, total, f"copying {chunk.path}"))
        except grpc.RpcError as error:
            self._failed(error, f"copying {model.model_id}")
        finally:
            for handle in handles.values():
                handle.close()
        for path, file in expected.items():
            if sizes.get(path) != file.size:
                raise DataLoss(f"{model.model_id}/{path}: received {sizes.get(path, 0)} bytes, expected {file.size}")
            if file.sha256 and hashes[path].hexdigest() != file.sha256:
                raise DataLoss(
                    f"{model.model_id}/{path}: sha256 mismatch after copy (expected {file.sha256}, got {hashes[path].hexdigest()})"
                )
