"""Fixtures of the deployment tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def dev_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh directory made by scripts/make_dev_secrets.sh, as a deployment would use it."""
    directory = tmp_path_factory.mktemp("deploy-secrets") / "secrets"
    subprocess.run(["bash", str(ROOT / "scripts" / "make_dev_secrets.sh"), str(directory)], check=True, timeout=120)
    return directory
