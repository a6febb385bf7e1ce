"""The start-up record: versions, commit, device, addresses and the effective settings with
secrets masked; a banner on a console, one structured record in JSON."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from voxserve_common.banner import log_startup
from voxserve_common.logs import configure_logging

SECRET = "hf_" + "Zq8Vn3Lp5Tr7Wx1Yb9Kd2Mf"


@dataclass(frozen=True)
class Settings:
    port: int = 50051
    data_dir: Path = Path("/var/lib/voxserve")
    hf_token: str | None = SECRET
    hub_endpoints: tuple[str, ...] = ("https://mirror.example/hf",)


@pytest.mark.usefixtures("restore_root")
def test_json_startup_record_has_versions_device_addresses_and_masked_config() -> None:
    stream = io.StringIO()
    handler = configure_logging("unit", stream=stream, fmt="json")
    log_startup("unit", {"grpc": "127.0.0.1:50051", "metrics": "127.0.0.1:9101"}, Settings(), console=False)
    handler.flush()
    (line,) = [json.loads(t) for t in stream.getvalue().splitlines() if '"startup"' in t]
    record = line["startup"]
    assert line["message"] == "startup"
    assert record["versions"]["grpcio"] and record["python"].count(".") == 2
    assert record["device"]["cpu_count"] >= 1
    assert record["listening"] == {"grpc": "127.0.0.1:50051", "metrics": "127.0.0.1:9101"}
    assert record["config"]["port"] == 50051 and record["config"]["data_dir"] == "/var/lib/voxserve"
    assert record["config"]["hf_token"] == "[REDACTED]"
    assert SECRET not in stream.getvalue()


@pytest.mark.usefixtures("restore_root")
def test_console_banner_lists_the_settings_without_secrets() -> None:
    stream = io.StringIO()
    handler = configure_logging("unit", stream=stream, fmt="console")
    log_startup("unit", {"grpc": "127.0.0.1:50051"}, Settings(), console=True)
    handler.flush()
    text = stream.getvalue()
    assert "listening: grpc 127.0.0.1:50051" in text and "port = 50051" in text
    assert "hf_token = [REDACTED]" in text and SECRET not in text
