"""queue.json: the downloads that were running, waiting or paused, kept across restarts."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_service.paths import validate_model_id, validate_revision
from model_service.shape import BadShape, as_list, as_object, move_aside, optional_str, read_json, typed
from model_service.state import atomic_write_bytes
from voxserve_common.errors import InvalidArgument

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadRequest:
    """What a queued or paused download asked for; persisted in queue.json across restarts."""

    model_id: str
    revision: str | None = None
    source: str | None = None  # a source name; None = every configured source

    def to_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "revision": self.revision, "source": self.source}

    @classmethod
    def from_json(cls, value: object, where: str) -> DownloadRequest:
        """A request from queue.json (untrusted); BadShape names the first bad field."""
        data = as_object(value, where)
        model_id = typed(data, "model_id", str, where)
        revision = optional_str(data, "revision", where)
        try:
            validate_model_id(model_id)
            if revision is not None:
                validate_revision(revision)
        except InvalidArgument as error:
            raise BadShape(f"{where}: {error}") from None
        return cls(model_id, revision, optional_str(data, "source", where))


class QueueFile:
    """queue.json: the running and waiting downloads in order, and the paused ones, replaced
    atomically (temp, fsync, rename) like state.json on every change of the queue.

    ``graceful`` is true only in the file a graceful stop wrote: its queue is what the
    next start resumes. After a crash (kill -9) the queue is not resumed: the models are
    INCOMPLETE with their partial files, and the next PullModel continues them with Range.
    """

    VERSION = 1

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[list[DownloadRequest], list[DownloadRequest], bool]:
        """(queued in order, paused, graceful); empty when missing. queue.json is untrusted:
        one unreadable or of the wrong shape is moved aside (logged, naming it) and nothing
        is resumed from it; the models' partial files stay for their next pull."""
        try:
            data = read_json(self.path)
        except FileNotFoundError:
            return [], [], False
        except (OSError, ValueError) as error:
            move_aside(self.path, "queue file unreadable", str(error))
            return [], [], False
        try:
            document = as_object(data, "queue.json")
            version = typed(document, "version", int, "queue.json", self.VERSION)
            if version != self.VERSION:
                raise BadShape(f"queue.json.version: {version}, this store reads version {self.VERSION}")
            queued = _requests(document, "queue")
            paused = _requests(document, "paused")
            graceful = typed(document, "graceful", bool, "queue.json", False)
        except BadShape as error:
            move_aside(self.path, "queue file of the wrong shape", str(error))
            return [], [], False
        return queued, paused, graceful

    def save(self, queued: list[DownloadRequest], paused: list[DownloadRequest], graceful: bool = False) -> None:
        payload = {
            "version": self.VERSION,
            "graceful": graceful,
            "queue": [r.to_json() for r in queued],
            "paused": [r.to_json() for r in paused],
        }
        atomic_write_bytes(self.path, json.dumps(payload, indent=1).encode())


def _requests(document: dict[str, object], key: str) -> list[DownloadRequest]:
    items = as_list(document.get(key, []), key)
    return [DownloadRequest.from_json(item, f"{key}[{index}]") for index, item in enumerate(items)]
