"""One decode thread shared by every live stream, finals before drafts.

CTranslate2 already spreads one decode over the cores (intra-op threads), and a model
replica runs one call at a time: more Python threads would only queue inside it. One
thread with a priority queue instead lets a stream's final result (latency the user
sees) overtake other streams' drafts. Batching the encoder across streams does not pay
on this CPU: three 30 s windows in one call took 0.83 s vs 0.24 s for one (3.5x).
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
    """Runs submitted calls one at a time in a daemon thread, lowest priority number first."""

    def __init__(self, name: str = "live-decode") -> None:
        self._heap: list[tuple[int, int, Future[Any], Callable[[], Any]]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

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
        self._thread.join(10)

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
