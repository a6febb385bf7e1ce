"""HTTPS and mutual TLS on the gateway's port (real certificates from trustme), rotation
without a restart, the gateway over mutual TLS with tokens to a real store and inference
service, the backend token, the insecure rule, and no secret in any log."""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import trustme
import yaml

from tests.http_gateway.conftest import GatewayHandle
from tests.support import (
    DATA_DIR,
    REPO_ROOT,
    TRANSCRIPTS,
    InferenceHandle,
    StoreHandle,
    free_port,
    wait_for,
    word_error_rate,
)
from voxserve_common.auth import token_sha256
from voxserve_common.config import ConfigError
from voxserve_http.__main__ import GatewayServer
from voxserve_http.config import GatewayConfig

SHORT = DATA_DIR / "speech_short.wav"
CALLER_TOKEN = "tok-caller-5d0f1e2a"  # read + transcribe: an HTTP caller's own token
GATEWAY_TOKEN = "tok-gateway-8c7b6a59"  # read + transcribe: the gateway's backend token
INFERENCE_TOKEN = "tok-inference-3e4f5a6b"  # read + pull: the inference service to the store
SECRETS = (CALLER_TOKEN, GATEWAY_TOKEN, INFERENCE_TOKEN)


@dataclass
class Pki:
    ca: trustme.CA
    directory: Path

    def write(self, name: str, blob: trustme.Blob) -> Path:
        path = self.directory / name
        blob.write_to_path(str(path))
        return path

    def ca_file(self, ca: trustme.CA | None = None, name: str = "ca.pem") -> Path:
        path = self.directory / name
        (ca or self.ca).cert_pem.write_to_path(str(path))
        return path

    def leaf(self, name: str, *hosts: str, ca: trustme.CA | None = None) -> tuple[Path, Path]:
        issued = (ca or self.ca).issue_cert(*(hosts or (f"{name}.clients.voxserve",)))
        return self.write(f"{name}.pem", issued.cert_chain_pems[0]), self.write(f"{name}.key", issued.private_key_pem)

    def server(self, name: str = "server", ca: trustme.CA | None = None) -> tuple[Path, Path]:
        return self.leaf(name, "127.0.0.1", "localhost", ca=ca)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    return Pki(trustme.CA(), directory)


def trusting(ca_file: Path, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """A client context that trusts ``ca_file`` (and presents ``client``'s certificate)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    return context


def healthz(url: str, context: ssl.SSLContext | bool) -> int:
    """GET /healthz on a new connection; the status code."""
    with httpx.Client(verify=context, timeout=30) as http:
        return http.get(f"{url}/healthz").status_code


# --------------------------------------------------------------------------- the gateway's own port


def test_the_sdk_over_https_while_plaintext_and_untrusting_clients_are_refused(
    pki: Pki, services: InferenceHandle, start_gateway: Callable[..., GatewayHandle]
) -> None:
    cert, key = pki.server()
    gateway = start_gateway(store=services.store, inference=services, tls_cert=cert, tls_key=key)
    assert gateway.base_url.startswith("https://")
    ca = pki.ca_file()
    client = gateway.client(http_client=httpx.Client(verify=trusting(ca), timeout=300))
    with open(SHORT, "rb") as audio:
        text = client.audio.transcriptions.create(model="whisper-1", file=audio).text
    assert word_error_rate(TRANSCRIPTS["speech_short.wav"], text) <= 0.25, text
    assert [m.id for m in client.models.list()]

    plaintext = f"http://127.0.0.1:{gateway.server.port}"
    with pytest.raises(httpx.TransportError):
        healthz(plaintext, False)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        healthz(gateway.base_url, True)  # the system's roots do not know this CA
    assert healthz(gateway.base_url, trusting(ca)) == 200


def test_mutual_tls_refuses_a_client_without_a_certificate_of_its_ca(
    pki: Pki, start_gateway: Callable[..., GatewayHandle]
) -> None:
    cert, key = pki.server()
    client_ca = pki.ca_file(name="client-ca.pem")
    gateway = start_gateway(tls_cert=cert, tls_key=key, tls_client_ca=client_ca)
    ca = pki.ca_file()
    assert healthz(gateway.base_url, trusting(ca, pki.leaf("ci-bot"))) == 200
    with pytest.raises(httpx.TransportError):
        healthz(gateway.base_url, trusting(ca))  # no client certificate
    stranger = trustme.CA()
    with pytest.raises(httpx.TransportError):
        healthz(gateway.base_url, trusting(ca, pki.leaf("stranger", ca=stranger)))  # signed by another CA


def test_a_rotated_certificate_is_served_without_a_restart(
    pki: Pki, tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    cert, key = pki.server()
    gateway = start_gateway(tls_cert=cert, tls_key=key)
    old_ca = pki.ca_file(name="old-ca.pem")
    assert healthz(gateway.base_url, trusting(old_ca)) == 200

    # The operator's rotation: new files written beside, then renamed over the old ones.
    new_ca = trustme.CA()
    new_cert, new_key = pki.server("next", ca=new_ca)
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    new_ca_file = pki.ca_file(new_ca, "new-ca.pem")

    def serves_the_new_certificate() -> bool:
        try:
            return healthz(gateway.base_url, trusting(new_ca_file)) == 200
        except httpx.ConnectError:
            return False

    wait_for(serves_the_new_certificate, timeout=30, interval=0.2, message="the new certificate served")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        healthz(gateway.base_url, trusting(old_ca))
    assert gateway.server.rotation[0].reloads == 1


def test_an_unreadable_rotated_file_keeps_the_previous_certificate(
    pki: Pki, start_gateway: Callable[..., GatewayHandle], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cert, key = pki.server()
    gateway = start_gateway(tls_cert=cert, tls_key=key)
    ca = pki.ca_file()
    cert.write_text("not a certificate\n")
    rotation = gateway.server.rotation[0]

    def reported() -> bool:
        healthz(gateway.base_url, trusting(ca))  # each handshake checks the files
        return any("cannot be read" in r.getMessage() for r in caplog.records)

    wait_for(reported, timeout=30, interval=0.2, message="the unreadable file reported")
    assert healthz(gateway.base_url, trusting(ca)) == 200
    assert rotation.reloads == 0


# --------------------------------------------------------------------------- the insecure rule


def test_an_open_bind_needs_tls_a_backend_token_or_insecure(pki: Pki, tmp_path: Path) -> None:
    open_bind = GatewayConfig(host="0.0.0.0", port=0, metrics_port=-1)
    with pytest.raises(ConfigError, match="--insecure"):
        GatewayServer(open_bind)
    token_file = tmp_path / "gateway.token"
    token_file.write_text(GATEWAY_TOKEN + "\n")
    cert, key = pki.server()
    for settings in ({"insecure": True}, {"backend_token_file": token_file}, {"tls_cert": cert, "tls_key": key}):
        config = GatewayConfig(host="0.0.0.0", port=0, metrics_port=-1, **settings)
        config.validate()
        GatewayServer(config)  # builds (nothing listens until serve())
    with pytest.raises(ConfigError, match="auth_tokens"):
        GatewayConfig(auth_tokens=tmp_path / "tokens.yaml").validate()
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        GatewayServer(GatewayConfig(port=0, tls_cert=cert))
    with pytest.raises(ConfigError, match="store_tls"):
        GatewayServer(GatewayConfig(port=0, store_tls_ca=tmp_path / "missing-ca.pem"))

    result = subprocess.run(
        [sys.executable, "-m", "voxserve_http", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "-1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--insecure" in result.stderr and "host" in result.stderr


# --------------------------------------------------------------------------- TLS and tokens to the backends


@dataclass
class SecureServices:
    """A store and an inference service serving mutual TLS and checking tokens; the
    client files a gateway needs to reach them."""

    store: StoreHandle
    inference: InferenceHandle
    ca: Path
    client_cert: Path
    client_key: Path
    gateway_token_file: Path

    def gateway_settings(self) -> dict[str, Any]:
        return {
            "store_tls_ca": self.ca,
            "store_tls_cert": self.client_cert,
            "store_tls_key": self.client_key,
            "inference_tls_ca": self.ca,
            "inference_tls_cert": self.client_cert,
            "inference_tls_key": self.client_key,
        }


@pytest.fixture
def secure_services(
    pki: Pki,
    tmp_path: Path,
    start_store: Callable[..., StoreHandle],
    start_inference: Callable[..., InferenceHandle],
) -> SecureServices:
    tokens = tmp_path / "tokens.yaml"
    roles = {
        "caller": (CALLER_TOKEN, ["read", "transcribe"]),
        "gateway": (GATEWAY_TOKEN, ["read", "transcribe"]),
        "inference": (INFERENCE_TOKEN, ["read", "pull"]),
    }
    entries = {name: {"sha256": token_sha256(token), "roles": r} for name, (token, r) in roles.items()}
    tokens.write_text(yaml.safe_dump({"tokens": entries}))
    ca = pki.ca_file()
    cert, key = pki.server()
    serving = {"tls_cert": cert, "tls_key": key, "tls_client_ca": ca, "auth_tokens": tokens}
    store = start_store(import_embedded=True, **serving)
    inference_cert, inference_key = pki.leaf("inference")
    inference_token = tmp_path / "inference.token"
    inference_token.write_text(INFERENCE_TOKEN + "\n")
    inference = start_inference(
        store,
        store_tls_ca=ca,
        store_tls_cert=inference_cert,
        store_tls_key=inference_key,
        store_token_file=inference_token,
        **serving,
    )
    client_cert, client_key = pki.leaf("gateway")
    gateway_token = tmp_path / "gateway.token"
    gateway_token.write_text(GATEWAY_TOKEN + "\n")
    return SecureServices(store, inference, ca, client_cert, client_key, gateway_token)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(f"{r.getMessage()} {r.__dict__}" for r in self.records)


@pytest.fixture
def all_records() -> Iterator[_Records]:
    """Every record of this process (the services and the gateway run in it)."""
    records = _Records()
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(records)
    yield records
    root.removeHandler(records)
    root.setLevel(saved)


def post_audio(http: httpx.Client, headers: dict[str, str] | None = None) -> httpx.Response:
    files = {"file": ("short.wav", SHORT.read_bytes(), "audio/wav")}
    return http.post("/v1/audio/transcriptions", files=files, data={"model": "whisper-1"}, headers=headers or {})


def test_the_gateway_reaches_mutual_tls_backends_with_the_callers_token(
    secure_services: SecureServices, start_gateway: Callable[..., GatewayHandle], all_records: _Records
) -> None:
    gateway = start_gateway(
        store=secure_services.store, inference=secure_services.inference, **secure_services.gateway_settings()
    )
    text = gateway.client(api_key=CALLER_TOKEN).audio.transcriptions.create(
        model="whisper-1", file=("short.wav", SHORT.read_bytes())
    )
    assert word_error_rate(TRANSCRIPTS["speech_short.wav"], text.text) <= 0.25, text.text
    assert [m.id for m in gateway.client(api_key=CALLER_TOKEN).models.list()]
    with gateway.http() as http:
        anonymous = post_audio(http)  # no Authorization and no backend token: the services say 401
        assert anonymous.status_code == 401, anonymous.text
        assert anonymous.json()["error"]["type"] == "authentication_error"
        assert http.get("/api/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        gateway.client(api_key="tok-wrong").models.list()
    logged = all_records.text()
    assert all(secret not in logged for secret in SECRETS)


def test_the_backend_token_serves_callers_without_authorization(
    secure_services: SecureServices, start_gateway: Callable[..., GatewayHandle], all_records: _Records
) -> None:
    gateway = start_gateway(
        store=secure_services.store,
        inference=secure_services.inference,
        backend_token_file=secure_services.gateway_token_file,
        **secure_services.gateway_settings(),
    )
    with gateway.http() as http:
        answer = post_audio(http)
        assert answer.status_code == 200, answer.text
        assert word_error_rate(TRANSCRIPTS["speech_short.wav"], answer.json()["text"]) <= 0.25
        # A caller's own Authorization is forwarded as it is, never replaced by the gateway's.
        wrong = post_audio(http, {"Authorization": "Bearer tok-not-known"})
        assert wrong.status_code == 401, wrong.text
        # The gateway's token has no admin role: deleting stays closed to anonymous callers.
        assert http.delete("/api/models/whisper-tiny.en").status_code == 403
    logged = all_records.text()
    assert all(secret not in logged for secret in SECRETS)


def test_the_entry_point_serves_https_and_metrics_to_tls_backends_without_logging_secrets(
    pki: Pki, tmp_path: Path, secure_services: SecureServices
) -> None:
    cert, key = pki.server("gateway-server")
    port, metrics_port = free_port(), free_port()
    log_dir = tmp_path / "gateway-logs"
    settings = tmp_path / "gateway.yaml"
    settings.write_text(yaml.safe_dump({"log_level": "INFO", "max_event_streams": 64}))
    s = secure_services
    args = [
        sys.executable, "-m", "voxserve_http", "--config", str(settings),
        "--port", str(port), "--metrics-port", str(metrics_port),
        "--inference", s.inference.address, "--store", s.store.address, "--log-format", "json",
        "--log-dir", str(log_dir), "--tls-cert", str(cert), "--tls-key", str(key),
        "--store-tls-ca", str(s.ca), "--store-tls-cert", str(s.client_cert), "--store-tls-key", str(s.client_key),
        "--inference-tls-ca", str(s.ca), "--inference-tls-cert", str(s.client_cert),
        "--inference-tls-key", str(s.client_key), "--backend-token-file", str(s.gateway_token_file),
    ]  # fmt: skip
    stderr_path = tmp_path / "gateway.stderr"
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    base_url = f"https://127.0.0.1:{port}"
    context = trusting(s.ca)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"gateway exited {process.returncode}: {stderr_path.read_text()}")
            try:
                with httpx.Client(verify=context, timeout=5) as http:
                    return http.get(f"{base_url}/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=90, interval=0.2, message="the gateway process ready over HTTPS")
        with httpx.Client(base_url=base_url, verify=context, timeout=300) as http:
            answer = post_audio(http)  # no Authorization: the backend token is sent
            assert answer.status_code == 200, answer.text
            assert answer.json()["text"]
            caller = post_audio(http, {"Authorization": f"Bearer {CALLER_TOKEN}"})
            assert caller.status_code == 200, caller.text
        counted = 'voxserve_http_requests_total{route="/v1/audio/transcriptions",status="200"} 2.0'

        def scrape() -> str:
            text = httpx.get(f"https://127.0.0.1:{metrics_port}/metrics", verify=context, timeout=10).text
            return text if counted in text else ""

        wait_for(scrape, timeout=30, message="the HTTPS /metrics endpoint counts both")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)

        # SIGHUP re-reads the settings: the log level applies at once, the rest is reported.
        settings.write_text(yaml.safe_dump({"log_level": "DEBUG", "max_event_streams": 3}))
        process.send_signal(signal.SIGHUP)

        def reloaded() -> dict[str, Any] | None:
            for line in stderr_path.read_text(errors="replace").splitlines():
                if line.startswith("{") and json.loads(line)["message"] == "settings reloaded":
                    return dict(json.loads(line))
            return None

        record = wait_for(reloaded, timeout=30, message="settings reloaded")
        assert record["applied"] == ["log_level"] and record["needs_restart"] == ["max_event_streams"], record
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    stderr_text = stderr_path.read_text(errors="replace")
    lines = [json.loads(line) for line in stderr_text.splitlines() if line.startswith("{")]
    startup = next(line["startup"] for line in lines if line["message"] == "startup")
    assert startup["listening"]["https"] == f"127.0.0.1:{port}"
    assert startup["config"]["store_tls_ca"] == str(s.ca)
    assert any(line["message"] == "gateway stopped" for line in lines)
    log_file = log_dir / "http_gateway.log"
    assert log_file.exists(), sorted(p.name for p in log_dir.iterdir())
    file_text = log_file.read_text()
    assert "http request finished" in file_text
    for text in (stderr_text, file_text):
        assert all(secret not in text for secret in SECRETS)
