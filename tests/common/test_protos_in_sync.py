"""The committed generated code is exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import filecmp
from pathlib import Path

from scripts.gen_protos import ROOT, generate


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(ROOT) for p in (ROOT / "voxserve").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert generated == committed
    for relative in generated:
        assert filecmp.cmp(tmp_path / relative, ROOT / relative, shallow=False), (
            f"{relative} is stale: run scripts/gen_protos.py"
        )
