"""Network faults between real processes on loopback: a throttled link, a port that drops every connection."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

CHUNK = 64 << 10


class ThrottledProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``; what the target sends back is
    passed on at ``bytes_per_second`` (None: at full speed; changeable while connections run)."""

    def __init__(self, target_port: int, bytes_per_second: int | None = None) -> None:
        self.target_port = target_port
        self.bytes_per_second = bytes_per_second
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        with self._lock:
            sockets, self._sockets = [self._listener, *self._sockets], []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        with contextlib.suppress(OSError):
            while True:
                rate = self.bytes_per_second if throttled else None
                data = source.recv(min(CHUNK, max(rate // 20, 1)) if rate else CHUNK)
                if not data:
                    break
                sink.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


class DroppingPort:
    """Holds 127.0.0.1:``port`` while a server is down: accepts each connection and closes it at
    once (a failed connection attempt for a gRPC channel, like a refused one), noting when it
    came, so a test sees the client's reconnect attempts."""

    def __init__(self, port: int) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self.attempts: list[float] = []  # time.monotonic() of each connection
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="dropping-port", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Free the port (for the server to bind again)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(10)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.attempts.append(time.monotonic())
            connection.close()
