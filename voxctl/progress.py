"""One status line on stderr: redrawn in place on a terminal, throttled lines in a log."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TextIO

_CLEAR_LINE = "\r\x1b[K"


class StatusLine:
    """Shows the latest status text without flooding the output.

    On a TTY the line is redrawn with ``\\r`` (at most ``tty_interval`` apart, at once on
    a change of ``key``). Elsewhere a full line is printed at most every ``interval``
    seconds, plus on every change of ``key`` (a state or phase), so logs of CI jobs stay
    short but still record every transition.
    """

    def __init__(
        self,
        stream: TextIO,
        tty: bool | None = None,
        interval: float = 2.0,
        tty_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.tty = _isatty(stream) if tty is None else tty
        self.interval = tty_interval if self.tty else interval
        self.clock = clock
        self.text = ""
        self.key: object = None
        self.shown_text = ""
        self.last_shown = float("-inf")
        self.drawn = False  # a TTY line is on screen without its newline

    def update(self, text: str, key: object = None) -> None:
        """Record ``text``; show it if ``key`` changed or the interval has passed."""
        self.text = text
        now = self.clock()
        if key == self.key and now - self.last_shown < self.interval:
            return
        self.key = key
        self.last_shown = now
        self._show()

    def note(self, text: str) -> None:
        """Print a permanent line (an event worth keeping) above the status line."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()
        self.restore()

    def clear(self) -> None:
        """Erase the TTY line before other output goes to the same terminal."""
        if self.tty and self.drawn:
            self.stream.write(_CLEAR_LINE)
            self.stream.flush()
            self.drawn = False

    def restore(self) -> None:
        if self.tty and self.text and not self.drawn:
            self._show()

    def done(self) -> None:
        """End the status display: the last text stays, followed by a newline."""
        if self.tty:
            if self.drawn:
                self.stream.write("\n")
                self.stream.flush()
                self.drawn = False
        elif self.text and self.text != self.shown_text:
            self._show()
        self.text = ""

    def _show(self) -> None:
        if self.tty:
            width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
            self.stream.write(_CLEAR_LINE + self.text[:width])
            self.drawn = True
        else:
            self.stream.write(self.text + "\n")
        self.shown_text = self.text
        self.stream.flush()


def bar(fraction: float, width: int = 24) -> str:
    """``[#########...............]`` for a fraction in 0..1 (clamped)."""
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
