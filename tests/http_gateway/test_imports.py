"""The gateway talks to the services over gRPC only: none of its modules imports a service
package (what both need lives in voxserve_common)."""

from __future__ import annotations

import ast
from pathlib import Path

import voxserve_http

SERVICE_PACKAGES = ("model_service", "inference_service")


def test_the_gateway_imports_no_service_package() -> None:
    found = []
    for path in sorted(Path(voxserve_http.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}: {name}" for name in names if name.split(".")[0] in SERVICE_PACKAGES]
    assert not found
