"""The one retry loop of hub requests: ask the endpoint's breaker, send, report the outcome
to the breaker, back off and try again while the budget lasts."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

from model_service.errors import DownloadCancelled
from model_service.store.download.hub import BodyDropped, CircuitOpen, SourceError
from model_service.store.download.sources import FAILURE_KINDS, SourceBreakers
from model_service.urls import display_url

logger = logging.getLogger(__name__)

T = TypeVar("T")

# First retry after about this long, then doubling (with jitter): a hiccup costs little,
# an outage is not hammered.
FIRST_BACKOFF_SECONDS = 0.25
MAX_BACKOFF_SECONDS = 10.0

# What a manifest request retries on the same endpoint (within download_retries): the next
# try may work. A refused connection means the endpoint is down: the next endpoint is tried
# at once.
TRANSIENT_KINDS = frozenset({"http_5xx", "reset", "timeout"})
# What a file request retries: every failure but bytes that failed their check (as the file
# downloader always has; a bad body is not fetched twice from the same endpoint).
FILE_RETRY_KINDS = frozenset(FAILURE_KINDS) - {"integrity"}


def backoff_delay(attempt: int, base: float) -> float:
    """Exponential backoff with jitter before retry ``attempt`` (1, 2, ...): between half
    and all of base * 2^(attempt-1), capped, so retries of many clients spread out."""
    ceiling = min(base * 2 ** max(attempt - 1, 0), MAX_BACKOFF_SECONDS)
    return float(ceiling * random.uniform(0.5, 1.0))


class Retrier:
    """Runs requests against one endpoint with ``retries`` attempts each (live: SIGHUP sets
    it), counting every failed request in the endpoint's circuit breaker."""

    def __init__(self, breakers: SourceBreakers, retries: int, backoff: float = FIRST_BACKOFF_SECONDS) -> None:
        self.breakers = breakers
        self.retries = retries
        self.backoff = backoff

    def call(
        self,
        endpoint: str,
        request: Callable[[], T],
        *,
        retry_kinds: frozenset[str],
        cancel: threading.Event,
        cancelled: str,
        log_fields: Mapping[str, object] | None = None,
    ) -> T:
        """``request()`` until it returns. A definitive not-found is an answer, not an outage:
        raised at once and not counted in the breaker. A BodyDropped after new bytes counts
        as a success and gives the budget back (the endpoint works, the network hiccuped).

        Raises CircuitOpen when the breaker refuses; the last SourceError when its kind is
        not in ``retry_kinds`` or the budget is spent; DownloadCancelled(``cancelled``) when
        ``cancel`` is set during a backoff.
        """
        fields = dict(log_fields or {})
        attempts_left, failed_in_a_row, attempts = self.retries, 0, 0
        while True:
            refused = self.breakers.allow(endpoint)
            if refused:
                if not attempts:
                    logger.debug(
                        "source skipped: circuit open",
                        extra={**fields, "endpoint": display_url(endpoint), "reason": refused},
                    )
                raise CircuitOpen(endpoint, refused, attempts)
            attempts += 1
            try:
                result = request()
            except SourceError as error:
                if error.not_found:
                    raise
                if isinstance(error, BodyDropped) and error.progressed:
                    self.breakers.success(endpoint)
                    attempts_left, failed_in_a_row = self.retries, 0
                else:
                    self.breakers.failure(endpoint, error.kind, error.reason)
                    attempts_left, failed_in_a_row = attempts_left - 1, failed_in_a_row + 1
                if error.kind not in retry_kinds or attempts_left <= 0:
                    raise
                delay = backoff_delay(max(failed_in_a_row, 1), self.backoff)
                if isinstance(error, BodyDropped):
                    logger.info(
                        "connection dropped; resuming", extra={**fields, "endpoint": endpoint, "offset": error.offset}
                    )
                else:
                    logger.info(
                        "hub source failed; retrying",
                        extra={
                            **fields,
                            "endpoint": endpoint,
                            "reason": error.reason,
                            "attempt": failed_in_a_row,
                            "delay": round(delay, 3),
                        },
                    )
                if cancel.wait(delay):
                    raise DownloadCancelled(cancelled) from error
                continue
            self.breakers.success(endpoint)
            return result
