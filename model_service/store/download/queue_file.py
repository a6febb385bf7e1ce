"""queue.json: the downloads that were running, waiting or paused, kept across restarts."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_service.state import atomic_write_bytes

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
    def from_json(cls, data: dict[str, Any]) -> DownloadRequest:
        return cls(str(data["model_id"]), data.get("revision") or None, data.get("source") or None)


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
        """(queued in order, paused, graceful); empty when missing or unreadable."""
        try:
            data = json.loads(self.path.read_text())
            queued = [DownloadRequest.from_json(item) for item in data.get("queue", [])]
            paused = [DownloadRequest.from_json(item) for item in data.get("paused", [])]
            graceful = data.get("graceful") is True
        except FileNotFoundError:
            return [], [], False
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.error("queue file unreadable; no download resumed", extra={"error": str(error)})
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
