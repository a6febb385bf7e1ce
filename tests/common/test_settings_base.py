"""Both services share one settings base: a bad shared setting stops either entry point the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference_service.config import InferenceConfig
from model_service.config import ModelStoreConfig
from tests.support import REPO_ROOT
from voxserve_common.config import ConfigError, ServiceSettings, load_config

SERVICES = ["model_service", "inference_service"]
CONFIGS = [ModelStoreConfig, InferenceConfig]


@pytest.mark.parametrize("module", SERVICES)
def test_entry_point_rejects_unknown_log_level(module: str, tmp_path: Path) -> None:
    """VOXSERVE_LOG_LEVEL=verbose exits 2 with the key in the message, before anything starts."""
    env = {
        **os.environ,
        "VOXSERVE_LOG_LEVEL": "verbose",
        "VOXSERVE_PORT": "0",
        "VOXSERVE_METRICS_PORT": "-1",
        "VOXSERVE_DATA_DIR": str(tmp_path / "models"),
        "VOXSERVE_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO_ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-m", module],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "log_level" in result.stderr and "verbose" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("config_class", CONFIGS)
def test_shared_settings_are_declared_once(config_class: type[ServiceSettings]) -> None:
    """A service's config only changes the defaults of its ports; the rest comes from the base."""
    assert issubclass(config_class, ServiceSettings)
    own = set(vars(config_class).get("__annotations__", {}))
    assert own.isdisjoint({"host", "grace_seconds", "log_level", "log_format"})


@pytest.mark.parametrize("config_class", CONFIGS)
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("VOXSERVE_LOG_LEVEL", "verbose"),
        ("VOXSERVE_LOG_FORMAT", "xml"),
        ("VOXSERVE_PORT", "70000"),
        ("VOXSERVE_METRICS_PORT", "-2"),
        ("VOXSERVE_GRACE_SECONDS", "-1"),
    ],
)
def test_shared_checks_apply_to_both_services(config_class: type[ServiceSettings], key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key.removeprefix("VOXSERVE_").lower()):
        load_config(config_class, env={key: value})
