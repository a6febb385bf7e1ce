"""scripts/make_dev_secrets.sh makes a CA, certificates and tokens that a real server with
mutual TLS and authentication accepts, with the roles the script gives each token."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest

from tests.support import REPO_ROOT
from voxserve.admin.v1 import admin_pb2 as pb
from voxserve.admin.v1 import admin_pb2_grpc
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
