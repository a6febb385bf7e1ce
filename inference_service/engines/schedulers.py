"""The decode schedulers of every loaded Whisper model: each made with the service's batch settings
and observer when its model loads, all given new settings at once by a reload (SIGHUP)."""

from __future__ import annotations

import threading
import weakref

from faster_whisper import WhisperModel

from inference_service.engines.batch_ops import encode_budget
from inference_service.engines.batching import BatchObserver, BatchSettings, DecodeScheduler, NullObserver

# An engine made without the service's settings (tests, benches, tools): every call runs alone, at once.
UNBATCHED = BatchSettings(batch_size=1, batch_window_ms=0.0)


class DecodeSchedulers:
    """Makes one ``DecodeScheduler`` per loaded model and keeps a weak reference to each, so that
    ``set_settings`` reaches every scheduler alive and a closed model's is forgotten."""

    def __init__(self, settings: BatchSettings = UNBATCHED, observer: BatchObserver | None = None) -> None:
        self.observer: BatchObserver = observer or NullObserver()
        self._settings = settings
        self._lock = threading.Lock()
        self._made: weakref.WeakSet[DecodeScheduler] = weakref.WeakSet()

    @property
    def settings(self) -> BatchSettings:
        return self._settings

    def make(self, model_id: str, whisper_model: WhisperModel) -> DecodeScheduler:
        """A running scheduler for a model that just loaded (its engine closes it); on the CPU,
        its encoder batches keep to the cache (``EncodeBudget``)."""
        budget = encode_budget(whisper_model.model)
        with self._lock:
            scheduler = DecodeScheduler(model_id, whisper_model, self._settings, self.observer, encode_budget=budget)
            self._made.add(scheduler)
        return scheduler

    def set_settings(self, settings: BatchSettings) -> None:
        """In force from each scheduler's next batch, and for models loaded later."""
        with self._lock:
            self._settings = settings
            schedulers = list(self._made)
        for scheduler in schedulers:
            scheduler.set_settings(settings)
