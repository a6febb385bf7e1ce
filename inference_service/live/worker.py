"""The decode threads every live stream shares, finals before drafts.

A stream has at most one decode in flight whose result it will use (a draft dropped for a final
may still be finishing beside it). Each decode runs on one of these threads and its
encoder and decoder calls go to the model's decode scheduler (engines/batching.py), which runs
the calls of every stream (and of file jobs) in shared batches: so there are as many threads
as streams may be open, and the threads only wait. When more decodes are queued than threads
are free (a smaller pool), a final result's decode overtakes drafts.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from voxserve_common.errors import ResourceExhausted

logger = logging.getLogger(__name__)

T = TypeVar("T")

FINAL = 0
DRAFT = 1


class DecodeWorker:
    """Runs submitted calls on ``threads`` daemon threads, lowest priority number first."""

    def __init__(self, name: str = "live-decode", threads: int = 1) -> None:
        self._heap: list[tuple[int, int, Future[Any], Callable[[], Any]]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{index}", daemon=True) for index in range(max(1, threads))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, call: Callable[[], T], priority: int = DRAFT) -> Future[T]:
        """Queue ``call``; cancelling the future before it starts removes the work.

        Raises ResourceExhausted once the worker is closed (the service is stopping).
        """
        future: Future[T] = Future()
        context = contextvars.copy_context()
        with self._cond:
            if self._closed:
                raise ResourceExhausted("the inference service is shutting down; retry on another instance")
            heapq.heappush(self._heap, (priority, next(self._order), future, lambda: context.run(call)))
            self._cond.notify()
        return future

    def queued(self) -> int:
        with self._cond:
            return len(self._heap)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = [item[2] for item in self._heap]
            self._heap.clear()
            self._cond.notify_all()
        for future in pending:
            future.cancel()
        for thread in self._threads:
            thread.join(10)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed and not self._heap:
                    return
                _, _, future, call = heapq.heappop(self._heap)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # noqa: BLE001 - handed to the stream that asked
                future.set_exception(exc)
