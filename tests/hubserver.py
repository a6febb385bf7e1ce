"""Hub-compatible HTTP server on loopback for tests: real huggingface_hub clients download from it.

The public hub cannot be reached from tests, so this server speaks the subset of the Hugging Face
Hub HTTP protocol that huggingface_hub 2.4.0 uses to read model repos
(see /work/shared/notes/huggingface-hub-facts.md):

* ``GET  /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}[?blobs=true]`` (model_info)
* ``GET  /api/models/{repo}/tree/{rev}[/{path}]?recursive=..`` (list_repo_tree, snapshot_download)
* ``POST /api/models/{repo}/paths-info/{rev}`` (get_paths_info; form or JSON body)
* ``HEAD|GET /{repo}/resolve/{rev}/{path}`` (hf_hub_download), with ``Range`` support

Repos are built by the test (``add_repo``); faults are injected while the server runs
(``fail_with``, ``drop_after``, ``throttle``, ``hang``, ``corrupt_file``, ``stop``), and what was
actually sent is accounted (``bytes_served``, ``requests``). It never sends Xet headers, so the
client always uses plain HTTP downloads against this server only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import http.server
import json
import logging
import pathlib
import re
import socket
import socketserver
import sys
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

LFS_THRESHOLD = 1024 * 1024
"""Files at least this big are stored as LFS, like the hub's default for binary weights."""

_CHUNK = 256 * 1024
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_FIXED_DATE = "2024-01-01T00:00:00.000Z"
_RECORDED_HEADERS = ("Range", "User-Agent", "Accept-Encoding", "Authorization", "Content-Type", "If-None-Match")

# Bound but never listening: connecting to these ports is refused, and nobody else can take them.
_REFUSING_SOCKETS: list[socket.socket] = []


def refused_endpoint() -> str:
    """Return an endpoint on which every connection is refused, to test an unreachable source."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    _REFUSING_SOCKETS.append(sock)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob, which the hub reports as the oid/ETag of non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class RequestRecord(NamedTuple):
    """One request as received: method, request target (path and query) and a few headers."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class _RepoFile:
    """A file of one commit; hashes are computed once so serving never re-reads content."""

    path: str
    size: int
    sha256: str
    blob_id: str  # git sha1 of the content, or of the LFS pointer for LFS files
    lfs: bool
    pointer_size: int
    data: bytes | None
    source: pathlib.Path | None
    corrupted: bytes | None = None

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    def iter_bytes(self, start: int, stop: int) -> Iterator[bytes]:
        """Yield the served bytes in [start, stop) in chunks, streaming from disk for Paths."""
        content = self.corrupted if self.corrupted is not None else self.data
        if content is not None:
            for offset in range(start, stop, _CHUNK):
                yield content[offset : min(offset + _CHUNK, stop)]
            return
        assert self.source is not None
        with self.source.open("rb") as fh:
            fh.seek(start)
            remaining = stop - start
            while remaining > 0:
                chunk = fh.read(min(_CHUNK, remaining))
                if not chunk:
                    raise OSError(f"{self.source} shrank while being served")
                remaining -= len(chunk)
                yield chunk

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling(self, blobs: bool) -> dict[str, Any]:
        sibling: dict[str, Any] = {"rfilename": self.path}
        if blobs:
            sibling["blobId"] = self.blob_id
            sibling["size"] = self.size
            if self.lfs:
                sibling["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return sibling


@dataclass
class _Commit:
    sha: str
    files: dict[str, _RepoFile]
    directories: dict[str, str]  # directory path -> tree oid

    def entry(self, path: str) -> dict[str, Any] | None:
        if path in self.files:
            return self.files[path].tree_entry()
        if path in self.directories:
            return {"type": "directory", "oid": self.directories[path], "size": 0, "path": path}
        return None

    def tree(self, base: str, recursive: bool) -> list[dict[str, Any]] | None:
        """Entries below ``base`` (None if it is not a directory), like the hub's /tree endpoint."""
        if base and base not in self.directories:
            return None
        prefix = f"{base}/" if base else ""
        entries: list[dict[str, Any]] = []
        for path in sorted([*self.directories, *self.files]):
            if not path.startswith(prefix):
                continue
            if recursive or "/" not in path[len(prefix) :]:
                entry = self.entry(path)
                assert entry is not None
                entries.append(entry)
        return entries


@dataclass
class _Repo:
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


@dataclass
class _Drop:
    nbytes: int
    remaining: int
    glob: str | None


def _matches(glob: str | None, file_path: str | None, url_path: str) -> bool:
    """A fault scoped by ``glob`` applies to a repo file path or, for API calls, to the URL path."""
    if glob is None:
        return True
    if file_path is not None and fnmatch.fnmatchcase(file_path, glob):
        return True
    return fnmatch.fnmatchcase(url_path, glob)


def _hash_file(data: bytes | None, source: pathlib.Path | None, size: int, lfs: bool) -> tuple[str, str | None]:
    """Return (sha256, git blob sha1 or None for LFS), streaming Paths in chunks."""
    sha256 = hashlib.sha256()
    sha1 = None if lfs else hashlib.sha1(b"blob %d\0" % size)
    chunks: Iterable[bytes]
    if data is not None:
        chunks = (data,)
    else:
        assert source is not None
        chunks = _read_chunks(source)
    for chunk in chunks:
        sha256.update(chunk)
        if sha1 is not None:
            sha1.update(chunk)
    return sha256.hexdigest(), None if sha1 is None else sha1.hexdigest()


def _read_chunks(source: pathlib.Path) -> Iterator[bytes]:
    with source.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            yield chunk


def _make_file(path: str, content: bytes | pathlib.Path, force_lfs: bool) -> _RepoFile:
    data: bytes | None = None
    source: pathlib.Path | None = None
    if isinstance(content, (bytes, bytearray, memoryview)):
        data = bytes(content)
        size = len(data)
    else:
        source = pathlib.Path(content)
        size = source.stat().st_size
    lfs = force_lfs or size >= LFS_THRESHOLD
    sha256, sha1 = _hash_file(data, source, size, lfs)
    pointer_size = 0
    if lfs:
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
        pointer_size = len(pointer)
        sha1 = git_blob_sha1(pointer)
    assert sha1 is not None
    return _RepoFile(path, size, sha256, sha1, lfs, pointer_size, data, source)


def _validate_repo_path(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid file path in repo: {path!r}")


class _HTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its open connections, so stop() can cut kept-alive ones."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the FQDN, which can stall on hosts without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Connections cut by the client, by drop_after or by stop() are expected in these tests.
        if isinstance(sys.exc_info()[1], OSError):
            return
        logger.exception("hub test server: error while handling a request from %s", client_address)


class _ConnectionCut(Exception):
    """Raised inside a handler to end the connection without a complete response."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("hub test server: " + format, *args)

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    # -- plumbing ---------------------------------------------------------------------------

    def _handle(self) -> None:
        hub = self.server.hub
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        hub._record(RequestRecord(self.command, self.path, self._recorded_headers()))
        split = urllib.parse.urlsplit(self.path)
        raw_segments = [s for s in split.path.split("/") if s]
        try:
            route = self._route(raw_segments)
            file_path = route[3] if route is not None and route[0] == "file" else None
            hub._apply_hang(file_path, split.path)
            status = hub._injected_status(file_path, split.path)
            if status is not None:
                self._send_error(status, None, f"injected failure {status}")
                return
            if route is None:
                self._send_error(404, None, f"no route for {split.path}")
            elif route[0] == "file":
                self._serve_file(route[1], route[2], route[3])
            else:
                self._serve_api(route[0], route[1], route[2], route[3], split.query, body)
        except _ConnectionCut:
            self.close_connection = True

    def _recorded_headers(self) -> dict[str, str]:
        return {name: value for name in _RECORDED_HEADERS if (value := self.headers.get(name)) is not None}

    def _route(self, segs: list[str]) -> tuple[str, str, str, str] | None:
        """Map raw URL segments to (kind, repo_id, revision, rest); segments are unquoted here."""
        unquote = urllib.parse.unquote
        if segs[:2] == ["api", "models"]:
            rest = segs[2:]
            repo_len = self._repo_id_length(rest, ("revision", "tree", "paths-info"))
            if repo_len is None:
                return None
            repo_id = unquote("/".join(rest[:repo_len]))
            tail = rest[repo_len:]
            if not tail:
                return ("info", repo_id, "main", "")
            if len(tail) < 2:
                return None
            kind = {"revision": "info", "tree": "tree", "paths-info": "paths-info"}[tail[0]]
            return (kind, repo_id, unquote(tail[1]), unquote("/".join(tail[2:])))
        repo_len = self._repo_id_length(segs, ("resolve",))
        if repo_len is None or len(segs) < repo_len + 3:
            return None
        return (
            "file",
            unquote("/".join(segs[:repo_len])),
            unquote(segs[repo_len + 1]),
            unquote("/".join(segs[repo_len + 2 :])),
        )

    def _repo_id_length(self, segs: list[str], keywords: tuple[str, ...]) -> int | None:
        """Number of segments forming the repo id ("owner/name" or a bare "name")."""
        known = self.server.hub._repo_ids()
        candidates = [n for n in (2, 1) if len(segs) >= n and (len(segs) == n or segs[n] in keywords)]
        for n in candidates:
            if urllib.parse.unquote("/".join(segs[:n])) in known:
                return n
        return candidates[0] if candidates else None

    def _send(self, status: int, headers: Mapping[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(200, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)

    def _send_error(
        self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        extra = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": message, **(headers or {})}
        if code is not None:
            extra["X-Error-Code"] = code
        self._send(status, extra, json.dumps({"error": message}).encode())

    def _lookup(self, repo_id: str, revision: str, headers: Mapping[str, str] | None = None) -> _Commit | None:
        """Resolve repo and revision, answering the hub's 404 error codes when either is unknown."""
        repo = self.server.hub._repo(repo_id)
        if repo is None:
            self._send_error(404, "RepoNotFound", f"Repository not found: {repo_id}", headers)
            return None
        commit = repo.resolve(revision)
        if commit is None:
            self._send_error(404, "RevisionNotFound", f"Invalid rev id: {revision}", headers)
        return commit

    # -- API ----------------------------------------------------------------------------------

    def _serve_api(self, kind: str, repo_id: str, revision: str, path: str, query: str, body: bytes) -> None:
        if (kind == "paths-info") != (self.command == "POST"):
            self._send_error(405, None, f"{self.command} not allowed here")
            return
        commit = self._lookup(repo_id, revision)
        if commit is None:
            return
        params = urllib.parse.parse_qs(query)
        if kind == "info":
            self._send_json(self._model_info(repo_id, commit, params))
        elif kind == "tree":
            recursive = params.get("recursive", ["false"])[0].lower() == "true"
            entries = commit.tree(path.strip("/"), recursive)
            if entries is None:
                self._send_error(404, "EntryNotFound", f"{path} does not exist on {revision}")
            else:
                self._send_json(entries)
        else:
            self._send_json([e for p in self._requested_paths(body) if (e := commit.entry(p.strip("/")))])

    def _requested_paths(self, body: bytes) -> list[str]:
        if "json" in (self.headers.get("Content-Type") or ""):
            paths = json.loads(body or b"{}").get("paths", [])
            return [paths] if isinstance(paths, str) else list(paths)
        form = urllib.parse.parse_qs(body.decode())
        return form.get("paths", []) + form.get("paths[]", [])

    @staticmethod
    def _model_info(repo_id: str, commit: _Commit, params: dict[str, list[str]]) -> dict[str, Any]:
        blobs = params.get("blobs", ["false"])[0].lower() == "true"
        files = [commit.files[p] for p in sorted(commit.files)]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/", maxsplit=1)[0] if "/" in repo_id else None,
            "sha": commit.sha,
            "lastModified": _FIXED_DATE,
            "createdAt": _FIXED_DATE,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "usedStorage": sum(f.size for f in files),
            "siblings": [f.sibling(blobs) for f in files],
        }
        expand = params.get("expand", []) + params.get("expand[]", [])
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        return info

    # -- files --------------------------------------------------------------------------------

    def _serve_file(self, repo_id: str, revision: str, path: str) -> None:
        commit = self._lookup(repo_id, revision)
        if commit is None:
            return
        entry = commit.files.get(path)
        if entry is None:
            missing = f"{path} does not exist on {revision}"
            self._send_error(404, "EntryNotFound", missing, {"X-Repo-Commit": commit.sha})
            return
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{entry.etag}"',
            "X-Linked-Etag": f'"{entry.etag}"',
            "X-Linked-Size": str(entry.size),
            "Content-Disposition": f"inline; filename*=UTF-8''{urllib.parse.quote(path.rsplit('/', 1)[-1])};",
        }
        start, stop, status = 0, entry.size, 200
        range_header = self.headers.get("Range")
        match = _RANGE_RE.fullmatch(range_header.strip()) if range_header else None
        if match is not None and (match.group(1) or match.group(2)):
            first, last = match.group(1), match.group(2)
            if first:
                start, stop = int(first), min(int(last) + 1, entry.size) if last else entry.size
            else:
                start, stop = max(entry.size - int(last), 0), entry.size
            if start >= entry.size or stop <= start:
                unsatisfiable = {**headers, "Content-Range": f"bytes */{entry.size}"}
                self._send_error(416, None, "range not satisfiable", unsatisfiable)
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{entry.size}"
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        if self.command == "GET":
            self._write_body(repo_id, entry, start, stop)

    def _write_body(self, repo_id: str, entry: _RepoFile, start: int, stop: int) -> None:
        """Write the body, honouring throttle and drop_after, and count what reached the socket."""
        hub = self.server.hub
        url_path = urllib.parse.urlsplit(self.path).path
        drop = hub._claim_drop(entry.path, url_path)
        limit = stop if drop is None else min(stop, start + drop)
        for chunk in entry.iter_bytes(start, limit):
            view = memoryview(chunk)
            while view:
                rate = hub._throttle_rate(entry.path, url_path)
                piece = view if rate is None else view[: max(1, rate // 20)]
                self.wfile.write(piece)
                hub._count(repo_id, entry.path, len(piece))
                view = view[len(piece) :]
                if rate is not None and hub._stopping.wait(len(piece) / rate):
                    raise _ConnectionCut()
        if drop is not None and limit < stop:
            self.wfile.flush()
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            raise _ConnectionCut()


class HubServer:
    """A hub-compatible HTTP server on 127.0.0.1 serving repos that the test defines.

    Use as a context manager or call ``start()`` / ``stop()``; ``stop()`` closes the listening socket
    and cuts open connections so later requests are refused, and ``start()`` again re-binds the same
    port with the same repos (a source that comes back).
    """

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._fail: tuple[int, str | None] | None = None
        self._hang: tuple[float, str | None] | None = None
        self._throttle: tuple[int, str | None] | None = None
        self._drops: list[_Drop] = []
        self._requests: list[RequestRecord] = []
        self._served: dict[tuple[str, str], int] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Bind (port 0 picks a free one, remembered for restarts) and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("HubServer is already running")
        self._stopping = threading.Event()
        self._httpd = _HTTPServer(("127.0.0.1", self._port), self)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hubserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open connections, so the next request is refused."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("HubServer has not been started yet, so it has no port")
        return self._port

    @property
    def endpoint(self) -> str:
        """Base URL to pass as ``endpoint=`` to huggingface_hub (HF_ENDPOINT is read at import)."""
        return f"http://127.0.0.1:{self.port}"

    def file_url(self, repo_id: str, path: str, revision: str = "main") -> str:
        """The /resolve URL of a file, as huggingface_hub.hf_hub_url builds it."""
        return f"{self.endpoint}/{repo_id}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(path)}"

    # -- repos --------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | pathlib.Path],
        revision: str = "main",
        lfs: set[str] | None = None,
        allow_unsafe_paths: bool = False,
    ) -> str:
        """Publish ``files`` as the head of branch ``revision`` and return the 40-hex commit sha.

        The commit is derived from the repo id and each file's path, sha256 and LFS flag, so it
        changes whenever content changes (the client caches tree listings by commit). Files given
        as Paths are hashed now by streaming and later served from disk. Earlier commits stay
        reachable by sha.
        """
        if _COMMIT_RE.fullmatch(revision):
            raise ValueError("revision must be a branch name, not a commit sha")
        lfs = lfs or set()
        built: dict[str, _RepoFile] = {}
        for path, content in files.items():
            if not allow_unsafe_paths:  # a hostile hub may list '../x'; tests of the store need one
                _validate_repo_path(path)
            built[path] = _make_file(path, content, path in lfs)
        commit_hash = hashlib.sha1(repo_id.encode() + b"\0")
        for path in sorted(built):
            commit_hash.update(f"{path}\0{built[path].sha256}\0{int(built[path].lfs)}\n".encode())
        sha = commit_hash.hexdigest()
        commit = _Commit(sha, built, self._directories(built))
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            repo.commits[sha] = commit
            repo.branches[revision] = sha
        return sha

    @staticmethod
    def _directories(files: Mapping[str, _RepoFile]) -> dict[str, str]:
        children: dict[str, list[str]] = {}
        for path, entry in files.items():
            parts = path.split("/")
            for depth in range(1, len(parts)):
                children.setdefault("/".join(parts[:depth]), []).append(f"{path}\0{entry.blob_id}")
        return {d: hashlib.sha1("\n".join(sorted(c)).encode()).hexdigest() for d, c in children.items()}

    def corrupt_file(self, repo_id: str, path: str, data: bytes | None, revision: str = "main") -> None:
        """Serve ``data`` (same size) for ``path`` while metadata keeps the original hashes.

        Tests sha256 verification, which huggingface_hub itself does not do. ``None`` restores.
        """
        with self._lock:
            repo = self._repos.get(repo_id)
            commit = repo.resolve(revision) if repo is not None else None
            if commit is None or path not in commit.files:
                raise KeyError(f"{repo_id}@{revision}: no file {path!r}")
            entry = commit.files[path]
            if data is not None and len(data) != entry.size:
                raise ValueError(f"corrupted data must keep the size {entry.size}, got {len(data)}")
            entry.corrupted = data

    def commit(self, repo_id: str, revision: str = "main") -> str:
        """The commit sha that ``revision`` currently resolves to."""
        with self._lock:
            repo = self._repos.get(repo_id)
            commit = repo.resolve(revision) if repo is not None else None
        if commit is None:
            raise KeyError(f"{repo_id}@{revision}")
        return commit.sha

    def _repo_ids(self) -> set[str]:
        with self._lock:
            return set(self._repos)

    def _repo(self, repo_id: str) -> _Repo | None:
        with self._lock:
            return self._repos.get(repo_id)

    # -- fault injection ----------------------------------------------------------------------

    def fail_with(self, status: int | None, path: str | None = None) -> None:
        """Answer every request (matching ``path`` glob, if given) with ``status``; None clears."""
        with self._lock:
            self._fail = None if status is None else (status, path)

    def drop_after(self, nbytes: int | None, times: int = 1, path: str | None = None) -> None:
        """On the next ``times`` file GETs (matching ``path``), close the connection after ``nbytes``
        body bytes, as a broken network does mid-download. Calls accumulate; None clears them all.
        """
        with self._lock:
            if nbytes is None:
                self._drops.clear()
            else:
                self._drops.append(_Drop(nbytes, times, path))

    def throttle(self, bytes_per_second: int | None, path: str | None = None) -> None:
        """Pace file bodies so a test can act mid-download (applies to bodies already streaming)."""
        with self._lock:
            self._throttle = None if bytes_per_second is None else (bytes_per_second, path)

    def hang(self, seconds: float | None, path: str | None = None) -> None:
        """Delay each response by ``seconds`` before answering, to exercise client timeouts."""
        with self._lock:
            self._hang = None if seconds is None else (seconds, path)

    def clear_faults(self) -> None:
        """Remove every injected fault (corrupted files excepted)."""
        with self._lock:
            self._fail = self._hang = self._throttle = None
            self._drops.clear()

    def _injected_status(self, file_path: str | None, url_path: str) -> int | None:
        with self._lock:
            fail = self._fail
        return fail[0] if fail is not None and _matches(fail[1], file_path, url_path) else None

    def _apply_hang(self, file_path: str | None, url_path: str) -> None:
        with self._lock:
            hang = self._hang
        if hang is not None and _matches(hang[1], file_path, url_path) and self._stopping.wait(hang[0]):
            raise _ConnectionCut()

    def _throttle_rate(self, file_path: str, url_path: str) -> int | None:
        with self._lock:
            throttle = self._throttle
        return throttle[0] if throttle is not None and _matches(throttle[1], file_path, url_path) else None

    def _claim_drop(self, file_path: str, url_path: str) -> int | None:
        with self._lock:
            for drop in self._drops:
                if drop.remaining > 0 and _matches(drop.glob, file_path, url_path):
                    drop.remaining -= 1
                    return drop.nbytes
        return None

    # -- accounting ---------------------------------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    def _count(self, repo_id: str, path: str, nbytes: int) -> None:
        with self._lock:
            self._served[(repo_id, path)] = self._served.get((repo_id, path), 0) + nbytes

    def bytes_served(self, repo_id: str | None = None, path: str | None = None) -> int:
        """File body bytes written to sockets, optionally for one repo and/or a path glob."""
        with self._lock:
            return sum(
                n
                for (repo, file_path), n in self._served.items()
                if (repo_id is None or repo == repo_id) and (path is None or fnmatch.fnmatchcase(file_path, path))
            )

    @property
    def requests(self) -> list[RequestRecord]:
        """Snapshot of the requests received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def reset_stats(self) -> None:
        with self._lock:
            self._requests.clear()
            self._served.clear()
