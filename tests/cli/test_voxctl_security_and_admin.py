"""voxctl against a store with TLS and tokens (--tls-ca, --token-file, VOXCTL_TOKEN), and
its pause/resume/sources, log-level and logs commands on real servers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import trustme
import yaml

from tests.hubserver import HubServer
from tests.support import StoreHandle, StoreProcess, wait_for
from voxctl.__main__ import main
from voxserve.modelstore.v1 import modelstore_pb2 as pb


def voxctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tls_and_token_flags(
    tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key, ca_file = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    token = "voxctl-token-19fe"
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump({"tokens": {"me": {"sha256": hashlib.sha256(token.encode()).hexdigest(), "roles": ["read"]}}})
    )
    (tmp_path / "token").write_text(token + "\n")
    store = StoreProcess(
        tmp_path,
        tmp_path / "data",
        hub,
        extra_args=["--tls-cert", str(cert), "--tls-key", str(key), "--auth-tokens", str(tokens)],
    )
    address = f"localhost:{store.port}"
    try:
        base = ("--store", address, "--tls-ca", str(ca_file))
        wait_for(
            lambda: voxctl(capsys, *base, "--token-file", str(tmp_path / "token"), "models", "ls")[0] == 0,
            timeout=60,
            interval=0.2,
        )
        code, out, _ = voxctl(capsys, *base, "--token-file", str(tmp_path / "token"), "models", "ls")
        assert code == 0 and "test-tiny" in out
        code, _, err = voxctl(capsys, *base, "models", "ls")
        assert code == 1 and "UNAUTHENTICATED" in err
        monkeypatch.setenv("VOXCTL_TOKEN", token)
        assert voxctl(capsys, *base, "models", "ls")[0] == 0
        code, _, err = voxctl(capsys, *base, "models", "rm", "test-tiny")
        assert code == 1 and "PERMISSION_DENIED" in err and "'admin'" in err
        monkeypatch.setenv("VOXCTL_TLS_CA", str(ca_file))
        assert voxctl(capsys, "--store", address, "models", "ls")[0] == 0
        code, _, err = voxctl(capsys, "--store", address, "--token-file", str(tmp_path / "nope"), "models", "ls")
        assert code == 2 and "token file" in err
    finally:
        store.close()


def test_pause_resume_and_sources(store: StoreHandle, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    hub.throttle(2 << 20, path="model.bin")
    list(store.stub.PullModel(pb.PullModelRequest(model_id="test-text"), timeout=60))
    call = store.stub.PullModel(pb.PullModelRequest(model_id="test-tiny"), timeout=120)
    wait_for(lambda: store.stub.GetModel(pb.GetModelRequest(model_id="test-tiny")).state == pb.DOWNLOADING)
    code, out, _ = voxctl(capsys, "--store", store.address, "models", "pause", "test-tiny")
    assert code == 0 and "paused" in out
    call.cancel()
    assert store.stub.GetModel(pb.GetModelRequest(model_id="test-tiny")).state == pb.PAUSED
    code, out, _ = voxctl(capsys, "--store", store.address, "--json", "models", "resume", "test-tiny")
    assert code == 0 and json.loads(out)["state"] in ("WAITING", "DOWNLOADING")
    code, out, _ = voxctl(capsys, "--store", store.address, "models", "sources")
    assert code == 0 and hub.endpoint in out and "CLOSED" in out
    voxctl(capsys, "--store", store.address, "models", "cancel", "test-tiny")


def test_log_level_for_a_while(store: StoreHandle, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = voxctl(capsys, "--store", store.address, "log-level", "model_service.pull", "DEBUG", "--for", "10m")
    assert (code == 0 and "-> DEBUG for 10 min" in out) or "-> DEBUG for" in out
    code, out, _ = voxctl(capsys, "--store", store.address, "log-level")
    assert code == 0 and "model_service.pull" in out and "DEBUG" in out and "until" in out
    code, _, err = voxctl(capsys, "--store", store.address, "log-level", "x", "LOUD")
    assert code == 1 and "INVALID_ARGUMENT" in err


def test_logs_subcommand_reads_log_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model_service.log").write_text(
        json.dumps(
            {
                "timestamp": "2026-01-01T00:00:00.000Z",
                "service": "model_service",
                "level": "ERROR",
                "message": "hub down",
                "error_category": "Unavailable",
            }
        )
        + "\n"
    )
    code, out, _ = voxctl(capsys, "logs", "--log-dir", str(tmp_path), "--errors", "--summary")
    assert code == 0 and "Unavailable" in out and "hub down" in out
