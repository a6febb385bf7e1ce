"""The shared settings on real service processes: bad values exit 2 naming the key (both
services), log files get every line up to a SIGTERM, SIGHUP re-reads the log levels, an
open non-loopback bind is refused, TLS and tokens come from the flags."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import trustme
import yaml

from tests.hubserver import HubServer
from tests.support import DATA_DIR, REPO_ROOT, StoreProcess, free_port, wait_for
from voxserve.admin.v1 import admin_pb2, admin_pb2_grpc
from voxserve.inference.v1 import inference_pb2, inference_pb2_grpc
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve_common.tls import ClientTls, open_channel


def run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("module", ["model_service", "inference_service"])
def test_a_bad_log_level_exits_2_naming_the_key(module: str, tmp_path: Path) -> None:
    result = run(module, "--port", "0", "--metrics-port", "-1", env={"VOXSERVE_LOG_LEVEL": "verbose"})
    assert result.returncode == 2, result.stderr
    assert "log_level" in result.stderr and "Traceback" not in result.stderr


def test_an_open_bind_on_another_address_needs_insecure(tmp_path: Path) -> None:
    result = run(
        "model_service", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "-1", "--data-dir", str(tmp_path)
    )
    assert result.returncode == 2 and "--insecure" in result.stderr, result.stderr


def test_log_files_hold_every_line_up_to_sigterm_and_sighup_rereads_levels(tmp_path: Path, hub: HubServer) -> None:
    logs = tmp_path / "logs"
    config = tmp_path / "store.yaml"
    config.write_text(yaml.safe_dump({"log_levels": {"voxserve.probe": "WARNING"}}))
    store = StoreProcess(tmp_path, tmp_path / "data", hub, extra_args=["--log-dir", str(logs), "--config", str(config)])
    try:
        store.wait_serving()
        admin = admin_pb2_grpc.AdminStub(store.channel)

        def level_of(name: str) -> str:
            levels = admin.GetLogLevels(admin_pb2.GetLogLevelsRequest(), timeout=10).loggers
            return next((entry.level for entry in levels if entry.logger == name), "")

        assert level_of("voxserve.probe") in ("", "WARNING")
        config.write_text(yaml.safe_dump({"log_levels": {"voxserve.probe": "DEBUG"}}))
        store.process.send_signal(signal.SIGHUP)
        wait_for(lambda: level_of("voxserve.probe") == "DEBUG", timeout=30, message="SIGHUP applied log_levels")

        store.stub.ListModels(pb.ListModelsRequest(), timeout=10)
        store.process.send_signal(signal.SIGTERM)
        assert store.process.wait(60) == 0
    finally:
        store.close()
    records = [json.loads(line) for line in (logs / "model_service.log").read_text().splitlines()]
    messages = [r["message"] for r in records]
    assert "startup" in messages and "settings reloaded" in messages
    assert "server stopped" in messages
    stderr_messages = [json.loads(line)["message"] for line in store.stderr().splitlines() if line.startswith("{")]
    assert messages[-1] == stderr_messages[-1]  # the last line before exit reached the file too
    assert all({"module", "function", "line", "service"} <= set(r) for r in records)


def test_tls_and_tokens_from_the_flags(tmp_path: Path, hub: HubServer) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    tokens = tmp_path / "tokens.yaml"
    token = "ops-token-0c41f2"
    tokens.write_text(
        yaml.safe_dump({"tokens": {"ops": {"sha256": hashlib.sha256(token.encode()).hexdigest(), "roles": ["admin"]}}})
    )
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--auth-tokens", str(tokens), "--host", "0.0.0.0"]
    store = StoreProcess(tmp_path, tmp_path / "data", hub, extra_args=args)
    try:
        with open_channel(f"localhost:{store.port}", ClientTls(ca_file), token) as channel:
            stub = modelstore_pb2_grpc_stub(channel)
            wait_for(lambda: _lists(stub), timeout=60, message="the TLS store answers with the token")
        with open_channel(f"localhost:{store.port}", ClientTls(ca_file)) as no_token:
            with pytest.raises(grpc.RpcError) as caught:
                modelstore_pb2_grpc_stub(no_token).ListModels(pb.ListModelsRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        store.close()
    assert token not in store.stderr()


def modelstore_pb2_grpc_stub(channel: grpc.Channel):  # type: ignore[no-untyped-def]
    from voxserve.modelstore.v1 import modelstore_pb2_grpc

    return modelstore_pb2_grpc.ModelStoreStub(channel)


def _lists(stub) -> bool:  # type: ignore[no-untyped-def]
    try:
        return len(stub.ListModels(pb.ListModelsRequest(), timeout=5).models) > 0
    except grpc.RpcError:
        return False


def test_inference_reaches_a_tls_store_with_its_own_token(tmp_path: Path, hub: HubServer) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    secrets = {"inference": "inf-tok-5d1e", "client": "cli-tok-77a0"}
    roles = {"inference": ["read", "pull"], "client": ["transcribe"]}
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": {
                    n: {"sha256": hashlib.sha256(t.encode()).hexdigest(), "roles": roles[n]} for n, t in secrets.items()
                }
            }
        )
    )
    (tmp_path / "inference-token").write_text(secrets["inference"] + "\n")
    tls_args = ["--tls-cert", str(cert), "--tls-key", str(key), "--auth-tokens", str(tokens)]
    store = StoreProcess(tmp_path, tmp_path / "data", hub, extra_args=tls_args)
    port = free_port()
    env = {**os.environ, "VOXSERVE_PRELOAD": "", "VOXSERVE_PIN": "", "VOXSERVE_DEFAULT_MODEL": "test-tiny"}
    inference = subprocess.Popen(
        [
            sys.executable, "-m", "inference_service", "--port", str(port), "--metrics-port", "-1",
            "--model-store", f"localhost:{store.port}", "--cache-dir", str(tmp_path / "cache"),
            "--store-tls-ca", str(ca_file), "--store-token-file", str(tmp_path / "inference-token"), *tls_args,
        ],
        cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with open_channel(f"localhost:{port}", ClientTls(ca_file), secrets["client"]) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            audio = (DATA_DIR / "speech_short.wav").read_bytes()

            def transcribed() -> bool:
                try:
                    events = list(stub.Transcribe(inference_pb2.TranscribeRequest(audio=audio), timeout=180))
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        return False  # still starting
                    raise
                return events[-1].WhichOneof("event") == "completed"

            wait_for(transcribed, timeout=180, interval=0.5, message="a transcription that pulls through the TLS store")
            with pytest.raises(grpc.RpcError) as caught:
                stub.UnloadModel(inference_pb2.UnloadModelRequest(model_id="test-tiny"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        inference.send_signal(signal.SIGTERM)
        _, errors = inference.communicate(timeout=60)
        store.close()
    assert secrets["inference"] not in errors and secrets["client"] not in errors


def test_two_hub_endpoints_with_one_name_exit_2(tmp_path: Path) -> None:
    result = run(
        "model_service", "--port", "0", "--metrics-port", "-1", "--data-dir", str(tmp_path),
        "--hub-endpoint", "mirror=http://127.0.0.1:9", "--hub-endpoint", "mirror=http://127.0.0.1:10",
    )  # fmt: skip
    assert result.returncode == 2 and "hub_endpoints" in result.stderr and "Traceback" not in result.stderr
