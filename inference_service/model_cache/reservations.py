"""Memory the cache's budget must hold besides loaded models: what live streams keep while they last.

A live stream holds a Silero VAD state, its audio buffer and a decode's copy of it; the
live service holds an ONNX Runtime session of the VAD model besides the cached engine.
None of it is a cached model, yet N streams add up. A reservation counts such bytes in
the cache's used memory (stats, the memory_used gauge, the room a load must make), so
that the cache evicts idle models, or refuses with CacheFull, instead of overcommitting.
``ModelCache.reserve`` makes them; the cache's state keeps the ones held and their total.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType


class Reservation:
    """Bytes counted in the cache's used memory until ``release()`` (or the end of a ``with``).

    ``release`` is the cache's, which knows each reservation it holds and ignores one it has
    let go already.
    """

    def __init__(self, label: str, nbytes: int, release: Callable[[Reservation], None]) -> None:
        self.label = label
        self.nbytes = nbytes
        self._release_to = release

    def release(self) -> None:
        """Stop counting the bytes; releasing twice is harmless."""
        self._release_to(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Reservation({self.label!r}, {self.nbytes} bytes)"
