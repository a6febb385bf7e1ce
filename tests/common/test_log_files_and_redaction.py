"""Log files (size and time rotation, gzip, pruning, error log) and secret redaction on
every handler, through the real configure_logging."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest

from voxserve_common.logfiles import LogFileSettings, RotatingLogFile, next_rollover
from voxserve_common.logs import configure_logging
from voxserve_common.redaction import MASK, Redactor, redact_settings

HF_TOKEN = "hf_" + "Q7pZr2Lx9Vb4Nm6Kd8Ws1Ty3"
BEARER = "vx-token-3f9a1c7e5b2d"
SETTING_SECRET = "store-secret-8d41e0"
URL_PASSWORD = "pa55w0rd-91"


def read_lines(path: Path) -> list[dict[str, object]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_files_get_json_lines_and_errors_get_their_own_file(tmp_path: Path, restore_root: None) -> None:
    configure_logging("unit", stream=io.StringIO(), files=LogFileSettings(directory=tmp_path))
    log = logging.getLogger("voxserve.test")
    log.info("pull started", extra={"model_id": "m1"})
    log.error("pull failed", extra={"model_id": "m1"})
    for handler in logging.getLogger().handlers:
        handler.flush()

    everything = read_lines(tmp_path / "unit.log")
    errors = read_lines(tmp_path / "unit.error.log")
    assert [line["message"] for line in everything] == ["pull started", "pull failed"]
    assert [line["message"] for line in errors] == ["pull failed"]
    assert everything[0]["service"] == "unit" and everything[0]["model_id"] == "m1"


def test_hostname_in_the_directory_gives_each_replica_its_own_files(tmp_path: Path, restore_root: None) -> None:
    """Replicas sharing one log volume: {hostname} in log_dir is each container's own name."""
    settings = LogFileSettings(directory=tmp_path / "{hostname}")
    assert settings.directory == tmp_path / socket.gethostname()
    configure_logging("unit", stream=io.StringIO(), files=settings)
    logging.getLogger("voxserve.test").info("replica started")
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert [line["message"] for line in read_lines(tmp_path / socket.gethostname() / "unit.log")] == ["replica started"]


def test_size_rotation_compresses_and_keeps_backup_count(tmp_path: Path) -> None:
    settings = LogFileSettings(directory=tmp_path, max_bytes=2_000, rotate_when="", backup_count=3)
    handler = RotatingLogFile(tmp_path / "svc.log", settings)
    handler.setFormatter(logging.Formatter('{"message": "%(message)s"}'))
    log = logging.getLogger("test.rotation.size")
    log.propagate = False
    log.addHandler(handler)
    try:
        for index in range(200):
            log.warning("line %04d %s", index, "x" * 40)
    finally:
        log.removeHandler(handler)
        handler.close()

    rotated = handler.rotated_files()
    assert len(rotated) == 3  # pruned to backup_count
    assert (tmp_path / "svc.log").stat().st_size <= 2_000
    kept = [line["message"] for path in rotated for line in read_lines(path)]
    kept += [line["message"] for line in read_lines(tmp_path / "svc.log")]
    numbers = [int(str(message).split()[1]) for message in kept]
    assert numbers == sorted(numbers) and numbers[-1] == 199  # newest lines kept, in order
    assert all(path.stat().st_size <= 2_000 for path in rotated)


def test_time_rotation_at_the_end_of_the_period_and_age_pruning(tmp_path: Path) -> None:
    settings = LogFileSettings(directory=tmp_path, max_bytes=0, rotate_when="H", backup_count=10, retention_days=7)
    old = tmp_path / "svc.log.20200101T000000.gz"
    with gzip.open(old, "wt") as handle:
        handle.write('{"message": "from 2020"}\n')
    eight_days_ago = time.time() - 8 * 86400
    os.utime(old, (eight_days_ago, eight_days_ago))

    handler = RotatingLogFile(tmp_path / "svc.log", settings)
    handler.setFormatter(logging.Formatter('{"message": "%(message)s"}'))
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "before", None, None)
    handler.handle(record)
    assert handler.rollover_at == next_rollover(time.time(), "H")
    handler.rollover_at = time.time() - 1  # the hour is over
    handler.handle(logging.LogRecord("t", logging.INFO, __file__, 1, "after", None, None))
    handler.close()

    rotated = handler.rotated_files()
    assert [read_lines(path) for path in rotated] == [[{"message": "before"}]]
    assert not old.exists()  # older than retention_days
    assert read_lines(tmp_path / "svc.log") == [{"message": "after"}]


def test_next_rollover_boundaries() -> None:
    moment = 1_700_000_123.5  # 2023-11-14T22:15:23.5Z
    assert next_rollover(moment, "H") == 1_700_002_800
    assert next_rollover(moment, "midnight") == 1_700_006_400
    assert next_rollover(moment, "") is None
    with pytest.raises(ValueError, match="log_rotate_when"):
        LogFileSettings(rotate_when="weekly")


def test_secrets_never_reach_any_handler(tmp_path: Path, restore_root: None) -> None:
    redactor = Redactor()
    redactor.add_secrets_of({"hf_token": HF_TOKEN, "auth_token": SETTING_SECRET, "log_level": "INFO"})
    stream = io.StringIO()
    configure_logging("unit", stream=stream, files=LogFileSettings(directory=tmp_path), redactor=redactor)
    log = logging.getLogger("voxserve.test")
    log.info("calling hub with token %s", HF_TOKEN)
    log.warning("rpc metadata", extra={"metadata": [("authorization", f"Bearer {BEARER}")]})
    log.info("config", extra={"settings": {"auth_token": SETTING_SECRET, "store": "x"}})
    log.info("unset secrets", extra={"tls_key": None, "max_tokens": 5})  # JSON literals stay valid JSON
    log.info("fetching https://ops:%s@mirror.internal/x?token=%s&page=2", URL_PASSWORD, BEARER)
    try:
        raise RuntimeError(f"hub refused authorization: Bearer {BEARER} (token {SETTING_SECRET})")
    except RuntimeError:
        log.exception("download failed")
    for handler in logging.getLogger().handlers:
        handler.flush()

    outputs = {
        "stream": stream.getvalue(),
        "file": (tmp_path / "unit.log").read_text(),
        "error file": (tmp_path / "unit.error.log").read_text(),
    }
    for name, text in outputs.items():
        for secret in (HF_TOKEN, BEARER, SETTING_SECRET, URL_PASSWORD):
            assert secret not in text, f"{secret} leaked into the {name}"
    assert MASK in outputs["error file"] and "Traceback" in outputs["error file"]
    assert "page=2" in outputs["file"] and "mirror.internal" in outputs["file"]  # the rest stays readable
    assert all(json.loads(line) for line in outputs["file"].splitlines())  # still valid JSON


def test_redacted_settings_mask_secret_named_values_only() -> None:
    shown = redact_settings({"hf_token": HF_TOKEN, "store_password": "p", "port": 50051, "empty_token": ""})
    assert shown == {"hf_token": MASK, "store_password": MASK, "port": 50051, "empty_token": ""}
