"""scripts/make_dev_secrets.sh makes a CA, certificates and tokens that a real server with
mutual TLS and authentication accepts, with the roles the script gives each token, client
certificates for the containers' health probes and Prometheus, and (--group) files the
containers' group can read."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tests.support import REPO_ROOT
from voxserve.admin.v1 import admin_pb2 as pb
from voxserve.admin.v1 import admin_pb2_grpc
from voxserve_common import healthcheck
from voxserve_common.auth import Authenticator
from voxserve_common.server import start_server
from voxserve_common.tls import ClientTls, ServerTls, open_aio_channel


def test_dev_secrets_work_with_mutual_tls_and_roles(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "make_dev_secrets.sh"), str(secrets)], check=True, timeout=120)
    assert "sha256" in (secrets / "tokens.yaml").read_text()
    for name in ("ops", "ci-bot", "inference", "gateway"):
        assert (secrets / f"token-{name}").read_text().strip() not in (secrets / "tokens.yaml").read_text()

    async def scenario() -> None:
        running = await start_server(
            register=lambda server: None,
            service_names=(),
            host="127.0.0.1",
            port=0,
            rpc_metrics=None,
            tls=ServerTls(secrets / "server.pem", secrets / "server.key", secrets / "ca.pem"),
            authenticator=Authenticator(secrets / "tokens.yaml"),
        )
        client = ClientTls(secrets / "ca.pem", secrets / "voxctl.pem", secrets / "voxctl.key")
        request = pb.SetLogLevelRequest(logger="voxserve.dev", level="INFO")
        try:
            ops = (secrets / "token-ops").read_text().strip()
            async with open_aio_channel(f"localhost:{running.port}", client, ops) as channel:
                assert (await admin_pb2_grpc.AdminStub(channel).SetLogLevel(request, timeout=30)).level == "INFO"
            ci = (secrets / "token-ci-bot").read_text().strip()
            async with open_aio_channel(f"localhost:{running.port}", client, ci) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await admin_pb2_grpc.AdminStub(channel).SetLogLevel(request, timeout=30)
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await running.stop(None)

    asyncio.run(scenario())


def test_dev_secrets_probe_and_scrape_a_mutual_tls_server(tmp_path: Path) -> None:
    """The healthcheck certificate passes the containers' probe, the prometheus one scrapes
    /metrics; without a client certificate both are refused (the server requires one)."""
    secrets = tmp_path / "secrets"
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "make_dev_secrets.sh"), str(secrets)], check=True, timeout=120)

    def probe(*flags: str, address: str) -> int:
        return healthcheck.main([f"--tls-ca={secrets / 'ca.pem'}", *flags, address])

    def scrape(port: int, client: str | None) -> int:
        context = ssl.create_default_context(cafile=str(secrets / "ca.pem"))
        if client:
            context.load_cert_chain(str(secrets / f"{client}.pem"), str(secrets / f"{client}.key"))
        with urllib.request.urlopen(f"https://localhost:{port}/metrics", timeout=30, context=context) as response:
            return int(response.status)

    async def scenario() -> None:
        registry = CollectorRegistry()
        running = await start_server(
            register=lambda server: None,
            service_names=(),
            host="127.0.0.1",
            port=0,
            rpc_metrics=None,
            metrics_registry=registry,
            metrics_port=0,
            tls=ServerTls(secrets / "server.pem", secrets / "server.key", secrets / "ca.pem"),
            authenticator=Authenticator(secrets / "tokens.yaml"),
        )
        address = f"127.0.0.1:{running.port}"
        try:
            client = (f"--tls-cert={secrets / 'healthcheck.pem'}", f"--tls-key={secrets / 'healthcheck.key'}")
            assert await asyncio.to_thread(probe, *client, address=address) == 0
            assert await asyncio.to_thread(probe, address=address) == 1
            assert running.metrics_endpoint is not None
            metrics_port = running.metrics_endpoint.port
            assert await asyncio.to_thread(scrape, metrics_port, "prometheus") == 200
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                await asyncio.to_thread(scrape, metrics_port, None)
        finally:
            await running.stop(None)

    asyncio.run(scenario())


def test_dev_secrets_group_makes_only_the_services_files_group_readable(tmp_path: Path) -> None:
    """--group GID: what a container reads (service keys, service tokens) is 0640 in group GID;
    the CA key and the people's tokens stay 0600. chgrp to a foreign group needs root: as
    another user the script must fail saying so."""
    secrets = tmp_path / "secrets"
    gid = 10001
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "make_dev_secrets.sh"), "--group", str(gid), str(secrets)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if os.geteuid() != 0 and gid not in os.getgroups():
        assert result.returncode == 1 and "run it as root" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    shared = ["server.key", "inference.key", "gateway.key", "healthcheck.key", "prometheus.key"]
    shared += ["token-inference", "token-gateway"]
    for name in shared:
        info = (secrets / name).stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o640, gid), name
    for name in ("ca.key", "token-ops", "token-ci-bot", "voxctl.key"):
        assert stat.S_IMODE((secrets / name).stat().st_mode) == 0o600, name
    info = secrets.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o750, gid)

    bad = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "make_dev_secrets.sh"), "--group", "staff", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "numeric GID" in bad.stderr
