"""Settings to TLS and authentication: unusable files and open exposure are start-up errors
naming the setting; loopback without authentication runs with a warning."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
import yaml

from voxserve_common.config import ConfigError
from voxserve_common.security import client_security, is_loopback, server_security


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens: Path | None = None
    insecure: bool = False


def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "", "::", "10.1.2.3", "model-store"))


def test_open_exposure_needs_insecure(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"host: binding 0\.0\.0\.0 with neither auth_tokens nor TLS"):
        server_security(Settings(host="0.0.0.0"), "unit")
    caplog.set_level(logging.WARNING)
    assert server_security(Settings(host="0.0.0.0", insecure=True), "unit") == (None, None)
    assert server_security(Settings(), "unit") == (None, None)
    assert "authentication is off" in caplog.text


def test_tls_or_tokens_allow_another_address(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("model-store")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    tls, auth = server_security(Settings(host="0.0.0.0", tls_cert=cert, tls_key=key), "unit")
    assert tls is not None and auth is None
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump({"tokens": {"ops": {"sha256": hashlib.sha256(b"t").hexdigest(), "roles": ["admin"]}}})
    )
    tls, auth = server_security(Settings(host="0.0.0.0", auth_tokens=tokens), "unit")
    assert tls is None and auth is not None


def test_unusable_files_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls_cert/tls_key.*go together"):
        server_security(Settings(tls_cert=tmp_path / "c.pem"), "unit")
    with pytest.raises(ConfigError, match=r"tls_cert/tls_key.*cannot read"):
        server_security(Settings(tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem"), "unit")
    (tmp_path / "tokens.yaml").write_text("tokens: [oops]")
    with pytest.raises(ConfigError, match="auth_tokens"):
        server_security(Settings(auth_tokens=tmp_path / "tokens.yaml"), "unit")
    with pytest.raises(ConfigError, match="store_tls_ca"):
        client_security(tmp_path / "missing-ca.pem", None, None, None, "store_tls_ca")
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"store_token_file.*empty"):
        client_security(None, None, None, empty, "store_token_file")
