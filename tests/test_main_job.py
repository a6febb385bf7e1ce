"""The README's main job (scripts/demo.sh) runs end to end, so it cannot silently rot."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_script_transcribes_the_sample(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"whisper-tiny\.en\s+whisper\s+READY", out), out
    segments = re.findall(r"^\[\d\d:\d\d\.\d\d -> \d\d:\d\d\.\d\d\] (.*)$", out, re.MULTILINE)
    assert len(segments) >= 2, out
    text = " ".join(segments).lower()
    for word in ("welcome", "computer", "model", "memory", "listening"):
        assert word in text, text
    assert "done: 18.38 s of audio" in result.stderr
    # Both services logged JSON lines and stopped gracefully.
    for name in ("model_service", "inference_service"):
        lines = (tmp_path / "data" / "logs" / f"{name}.log").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert records and all(r["service"] == name for r in records)
        assert any(r["message"] == "server stopped" for r in records)
