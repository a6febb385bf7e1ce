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
