"""Runtime log-level changes: set a logger's level now, optionally reverting by itself.

Used by the Admin service (SetLogLevel) and by SIGHUP re-reading the config file's levels.
Thread-safe; nothing here blocks (reverts run on a timer thread).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from voxserve_common.errors import InvalidArgument
from voxserve_common.logs import level_number

logger = logging.getLogger(__name__)

MAX_DURATION_SECONDS = 7 * 86400
# Dotted Python logger names; a client string never becomes anything else.
_LOGGER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*")


@dataclass(frozen=True)
class LevelChange:
    logger: str
    level: str
    previous_level: str
    reverts_at: float | None  # time.time()


def _logger_for(name: str) -> tuple[str, logging.Logger]:
    if name in ("", "root"):
        return "root", logging.getLogger()
    if len(name) > 200 or not _LOGGER_NAME.fullmatch(name):
        raise InvalidArgument(
            f"logger must be a dotted name such as 'model_service.pull' (at most 200 characters), not {name[:80]!r}"
        )
    return name, logging.getLogger(name)


class LogLevelControl:
    """Applies level changes and remembers the temporary ones until they revert."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._timers: dict[str, tuple[threading.Timer, float, int]] = {}  # name -> (timer, reverts_at, previous)
        self._known: set[str] = set()

    def set_level(self, name: str, level: str, duration_seconds: float = 0.0) -> LevelChange:
        """Set ``name``'s level; with a duration, restore the previous one afterwards.

        Raises InvalidArgument for a malformed name, an unknown level or a bad duration.
        """
        name, target = _logger_for(name)
        try:
            number = level_number(level, name)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        if not 0 <= duration_seconds <= MAX_DURATION_SECONDS:  # also False for NaN
            raise InvalidArgument(f"duration_seconds must be between 0 and {MAX_DURATION_SECONDS} (7 days)")
        with self._lock:
            pending = self._timers.pop(name, None)
            if pending is not None:
                pending[0].cancel()
            # A change on top of a temporary one reverts to what was there before both.
            previous = pending[2] if pending is not None else target.level
            target.setLevel(number)
            self._known.add(name)
            reverts_at = None
            if duration_seconds > 0:
                reverts_at = time.time() + duration_seconds
                timer = threading.Timer(duration_seconds, self._revert, args=(name, previous))
                timer.daemon = True
                self._timers[name] = (timer, reverts_at, previous)
                timer.start()
        change = LevelChange(name, logging.getLevelName(number), logging.getLevelName(previous), reverts_at)
        logger.warning(
            "log level changed",
            extra={
                "logger_name": name,
                "level": change.level,
                "previous_level": change.previous_level,
                "reverts_at": reverts_at,
            },
        )
        return change

    def _revert(self, name: str, previous: int) -> None:
        with self._lock:
            self._timers.pop(name, None)
            _logger_for(name)[1].setLevel(previous)
        logger.warning("log level reverted", extra={"logger_name": name, "level": logging.getLevelName(previous)})

    def apply(self, levels: Mapping[str, str]) -> list[LevelChange]:
        """Set lasting levels for several loggers (the config file's, e.g. on SIGHUP)."""
        return [self.set_level(name, level) for name, level in levels.items()]

    def levels(self) -> list[tuple[str, str, float | None]]:
        """(logger, level, reverts_at) for root and every logger changed or configured."""
        with self._lock:
            names = ["root", *sorted(self._known - {"root"})]
            timers = {name: entry[1] for name, entry in self._timers.items()}
        return [
            (name, logging.getLevelName(_logger_for(name)[1].getEffectiveLevel()), timers.get(name)) for name in names
        ]

    def close(self) -> None:
        """Cancel pending reverts (the process is ending)."""
        with self._lock:
            for timer, _, _ in self._timers.values():
                timer.cancel()
            self._timers.clear()
