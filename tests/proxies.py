"""The proxies of deploy/ as processes on loopback: HAProxy and nginx from their Debian packages, run
with the deployed configuration files (only the replicas' addresses, ports and file paths changed).

Used by the routing tests (tests/routing/) and bench/bench_routing.py.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.support import REPO_ROOT, free_port, wait_for

HAPROXY_CFG = REPO_ROOT / "deploy" / "haproxy" / "haproxy.cfg"
NGINX_CONF = REPO_ROOT / "deploy" / "nginx" / "nginx.conf"
SERVER_TEMPLATE = re.compile(r"^(\s*)server-template (\S+) \S+ \S+ (.*)$")
# What only DNS discovery needs; a static server line has its address.
DNS_OPTIONS = re.compile(r"\s*\b(resolvers|resolve-prefer|init-addr) \S+")


def haproxy_config(
    replicas: Sequence[str], balance: str | None = None, balance_factor: int | None = None, source: Path = HAPROXY_CFG
) -> str:
    """``source`` with each backend's ``server-template`` (replicas found through DNS) turned into
    one ``server replicaN ADDRESS`` line per replica with the template's options; when given, the
    by-model backend balanced by ``balance`` instead (e.g. ``roundrobin``) and with another
    ``hash-balance-factor``."""
    lines: list[str] = []
    templates = balances = factors = 0
    for line in source.read_text().splitlines():
        match = SERVER_TEMPLATE.match(line)
        if match:
            indent, prefix, options = match.groups()
            options = DNS_OPTIONS.sub("", options).strip()
            lines += [
                f"{indent}server {prefix}{i} {address} {options}".rstrip() for i, address in enumerate(replicas, 1)
            ]
            templates += 1
            continue
        if balance is not None and line.strip().startswith("balance hdr("):
            lines.append(line.replace(line.strip(), f"balance {balance}"))
            balances += 1
            continue
        if balance_factor is not None and line.strip().startswith("hash-balance-factor "):
            lines.append(line.replace(line.strip(), f"hash-balance-factor {balance_factor}"))
            factors += 1
            continue
        lines.append(line)
    assert templates == 2, f"{source} should have 2 server-template lines (by_model, by_load), found {templates}"
    assert balance is None or balances == 1, f"{source}: no 'balance hdr(...)' line to replace"
    assert balance_factor is None or factors == 1, f"{source}: no 'hash-balance-factor' line to replace"
    return "\n".join(lines) + "\n"


def haproxy_secrets(secrets: Path) -> Path:
    """HAProxy reads a certificate's key from ``<cert>.key`` (compose and Kubernetes mount
    haproxy.key under that name): the same here."""
    shutil.copyfile(secrets / "haproxy.key", secrets / "haproxy.pem.key")
    return secrets


class HAProxyProcess:
    """``haproxy -db`` with a configuration text, its runtime API on a unix socket."""

    def __init__(self, tmp_path: Path, config: str, secrets: Path, name: str = "haproxy") -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # A short path: a unix socket's path is at most 107 bytes, and pytest's tmp paths are long.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="hap-", dir="/tmp"))
        self.admin_socket = self._socket_dir / "admin.sock"
        self.config_path = tmp_path / f"{name}.cfg"
        self.config_path.write_text(config)
        self.log_path = tmp_path / f"{name}.log"
        env = {
            **os.environ,
            "VOXSERVE_SECRETS": str(secrets),
            "VOXSERVE_ROUTER_BIND": self.address,
            "VOXSERVE_ROUTER_METRICS_BIND": f"127.0.0.1:{self.metrics_port}",
            "HAPROXY_ADMIN_SOCKET": str(self.admin_socket),
        }
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["haproxy", "-db", "-f", str(self.config_path)], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(self._started, timeout=30, interval=0.05, message="haproxy's admin socket")

    def _started(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.process.returncode}: {self.log()}")
        return self.admin_socket.exists()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def command(self, line: str) -> str:
        """One command of the runtime API (``show stat``, ``set server b/s state drain``)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.admin_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self, backend: str) -> dict[str, str]:
        """Each server of ``backend`` with its status (UP, DOWN, MAINT, "UP 1/2" while changing)."""
        rows = csv.DictReader(io.StringIO(self.command("show stat").lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_status(self, backend: str, wanted: dict[str, str], timeout: float = 60) -> None:
        def reached() -> bool:
            found = self.servers(backend)
            return all(found.get(name) == status for name, status in wanted.items())

        wait_for(reached, timeout=timeout, interval=0.1, message=f"{backend} servers {wanted}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def nginx_config(replicas: Sequence[str], secrets: Path, port: int, source: Path = NGINX_CONF) -> str:
    """``source`` with the upstreams' servers on loopback, the listener on ``port`` and the
    secrets read from ``secrets`` instead of /run/secrets."""
    text = source.read_text()
    upstream_servers = re.compile(r"^(\s*)server inference:50052\b([^;]*);$", re.MULTILINE)
    assert len(upstream_servers.findall(text)) == 2, f"{source}: one 'server inference:50052' per upstream"
    text = upstream_servers.sub(
        lambda m: "\n".join(f"{m.group(1)}server {address}{m.group(2)};" for address in replicas), text
    )
    listen = "listen 50052 ssl http2;"
    assert listen in text, f"{source}: no '{listen}'"
    text = text.replace(listen, f"listen 127.0.0.1:{port} ssl http2;")
    return text.replace("/run/secrets/", f"{secrets}/")


class NginxProcess:
    """``nginx -g 'daemon off;'`` with a configuration text, in a prefix directory of its own."""

    def __init__(self, tmp_path: Path, replicas: Sequence[str], secrets: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        prefix = tmp_path / "nginx"
        prefix.mkdir(exist_ok=True)
        config = prefix / "nginx.conf"
        config.write_text(nginx_config(replicas, secrets, self.port))
        self.log_path = tmp_path / "nginx.log"
        command = ["nginx", "-p", str(prefix), "-c", str(config), "-g", f"daemon off; pid {prefix / 'nginx.pid'};"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._listening, timeout=30, interval=0.05, message="nginx listening")

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"nginx exited with {self.process.returncode}: {self.log()}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
