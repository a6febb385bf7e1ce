"""The inference service's borders: protobufs only at the edge, engines below live streams."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

PACKAGE = REPO_ROOT / "inference_service"
# The edge: the servicer dispatches, wire maps messages, __main__ registers the service;
# model_source is a client of the model store.
EDGE = {"servicer.py", "wire.py", "__main__.py", "model_source.py"}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules(*parts: str) -> list[Path]:
    return sorted(PACKAGE.joinpath(*parts).rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_edge_imports_protobufs_or_grpc(path: Path) -> None:
    if path.relative_to(PACKAGE).as_posix() in EDGE:
        return
    wire_level = [n for n in imports_of(path) if n == "grpc" or n.startswith(("grpc.", "voxserve."))]
    assert not wire_level, f"{path.relative_to(REPO_ROOT)} imports {wire_level}: map messages in wire.py"


@pytest.mark.parametrize("path", modules("engines"), ids=lambda p: p.name)
def test_engines_import_nothing_from_live_streams_or_jobs(path: Path) -> None:
    upward = [
        n
        for n in imports_of(path)
        if n.startswith(("inference_service.live", "inference_service.jobs", "inference_service.transcriber"))
    ]
    assert not upward, f"{path.relative_to(REPO_ROOT)} imports {upward}"
