"""FetchModelFiles: a READY model's files as a lazy stream of chunks, held against deletion."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator, Iterator
from dataclasses import dataclass

from model_service.errors import ModelNotReady
from model_service.paths import safe_join, validate_relative_file
from model_service.state import ModelState
from model_service.store.registry import ModelRegistry, ModelView
from voxserve_common.client_strings import shown
from voxserve_common.errors import NotFound

logger = logging.getLogger(__name__)

# gRPC clients refuse messages over 4 MiB by default; a chunk leaves room for its path,
# hashes and framing so FetchModelFiles works with a default channel at any chunk_size.
MAX_FETCH_CHUNK = (4 << 20) - (64 << 10)
DEFAULT_FETCH_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileChunkData:
    path: str
    offset: int
    data: bytes
    file_size: int
    sha256: str
    revision: str
    file_index: int
    files_total: int


class ModelReader:
    """Streams files of READY models; DeleteModel and ImportModel refuse while one is open."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    @contextlib.contextmanager
    def reading(self, model_id: str) -> Iterator[ModelView]:
        """Hold a READY model so DeleteModel refuses while its files are streamed.

        Raises ModelNotReady unless the model is READY. Entering it is quick (no I/O
        beyond file stats) and safe on the event loop.
        """
        registry = self.registry
        registry.catalog.get(model_id)
        with registry.locked():
            record = registry.record(model_id)
            if record.state != ModelState.READY:
                raise ModelNotReady(
                    f"{model_id} is {record.state.value}; only READY models can be fetched (PullModel first)"
                )
            registry.add_reader(model_id)
            view = registry.view(model_id)
        try:
            yield view
        finally:
            registry.remove_reader(model_id)

    def iter_file_chunks(
        self, model_id: str, chunk_size: int = DEFAULT_FETCH_CHUNK, paths: list[str] | None = None
    ) -> Generator[FileChunkData, None, None]:
        """The bytes of a READY model's files in order, with size and sha256 of each.

        Lazy: the model is held from the first ``next()`` until the generator ends or is
        closed. Each ``next()`` reads the disk, so drive it from a worker thread.
        Raises UnsafePath (InvalidArgument) for a path that could escape the model
        directory and NotFound for a path the model does not have.
        """
        chunk_size = max(4096, min(chunk_size or DEFAULT_FETCH_CHUNK, MAX_FETCH_CHUNK))
        with self.reading(model_id) as view:
            wanted = [f for f in view.files if not paths or f.path in paths]
            for name in paths or ():
                validate_relative_file(name)  # UnsafePath: '..', absolute, NUL... before any lookup
            unknown = sorted(set(paths or ()) - {f.path for f in view.files})
            if unknown:
                names = ", ".join(shown(name) for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
                raise NotFound(f"{model_id} has no file {names}; GetModel lists its files")
            model_dir = self.registry.model_dir(model_id)
            for index, file in enumerate(wanted):
                with open(safe_join(model_dir, file.path), "rb") as handle:
                    offset = 0
                    while True:
                        data = handle.read(chunk_size)
                        if not data and offset > 0:
                            break
                        yield FileChunkData(
                            file.path, offset, data, file.size, file.sha256, view.revision, index, len(wanted)
                        )
                        offset += len(data)
                        if not data:
                            break
