"""Typed config loading with clear errors, and the JSON log format."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest

from inference_service.config import InferenceConfig
from model_service.config import ModelStoreConfig
from voxserve_common.config import ConfigError, load_config
from voxserve_common.logs import configure_logging, log_context


def test_sources_in_order_defaults_yaml_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "store.yaml"
    path.write_text("port: 6000\nmax_concurrent_downloads: 2\nhub_endpoints: [http://mirror:1, http://hub:2]\n")
    config = load_config(
        ModelStoreConfig, yaml_path=path, env={"VOXSERVE_PORT": "7000"}, overrides={"metrics_port": 9999}
    )
    assert config.port == 7000
    assert config.max_concurrent_downloads == 2
    assert config.hub_endpoints == ("http://mirror:1", "http://hub:2")
    assert config.metrics_port == 9999
    assert config.heartbeat_seconds == ModelStoreConfig().heartbeat_seconds


def test_env_lists_and_bools() -> None:
    config = load_config(
        InferenceConfig, env={"VOXSERVE_PRELOAD": "silero-vad, htdemucs", "VOXSERVE_AUTO_PULL": "false"}
    )
    assert config.preload == ("silero-vad", "htdemucs")
    assert config.auto_pull is False


@pytest.mark.parametrize(
    "source, expected",
    [
        ({"env": {"VOXSERVE_PORT": "abc"}}, "VOXSERVE_PORT"),
        ({"env": {"VOXSERVE_AUTO_PULL": "maybe"}}, "VOXSERVE_AUTO_PULL"),
        ({"overrides": {"max_models": 0}}, "max_models"),
        ({"overrides": {"store_access": "nfs"}}, "store_access"),
        ({"env": {"VOXSERVE_MEMORY_BUDGET": "lots"}}, "memory_budget"),
    ],
)
def test_bad_values_name_the_key(source: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(InferenceConfig, env=source.get("env", {}), overrides=source.get("overrides"))


def test_unknown_yaml_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("max_downlods: 2\n")
    with pytest.raises(ConfigError, match="max_downlods"):
        load_config(ModelStoreConfig, yaml_path=path, env={})


def test_json_log_line_fields() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    handler = configure_logging("unit", fmt="json", stream=stream)
    try:
        with log_context(model_id="whisper-tiny.en", job_id="j1"):
            logging.getLogger("voxserve.test").info("step done", extra={"bytes": 5})
        handler.flush()  # records are written by the listener thread
    finally:
        root.removeHandler(handler)
        for old in saved_handlers:
            root.addHandler(old)
        root.setLevel(saved_level)
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["message"] == "step done" and line["level"] == "INFO" and line["service"] == "unit"
    assert line["logger"] == "voxserve.test" and line["model_id"] == "whisper-tiny.en" and line["job_id"] == "j1"
    assert line["bytes"] == 5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])
