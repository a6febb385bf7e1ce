"""mypy --strict finds no type errors in the hand-written packages (the style guide asks for it).

The settings (strict, generated code excluded, untyped third-party modules) live in
pyproject.toml's [tool.mypy]; ``--strict`` is passed here too so that the gate cannot be
loosened there without this test noticing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGES = ("voxserve_common", "model_service", "inference_service", "voxctl", "voxserve_http")


def test_mypy_strict_is_clean(tmp_path: Path) -> None:
    packages = [arg for package in PACKAGES for arg in ("-p", package)]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "mypy-cache"), *packages],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout
