"""The container image: deploy/Dockerfile installs from the lock, runs as a user with a
healthcheck, and its build context holds every package."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from typing import Any

from tests.deploy.deploy_facts import (
    DEPLOY,
    DOCKERFILE,
    GATEWAY_HTTP_PORT,
    GATEWAY_METRICS_PORT,
    GRPC_PORT,
    METRICS_PORT,
    ROOT,
)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile(pyproject: dict[str, Any]) -> None:
    instructions = _dockerfile_instructions()
    runs = [args for op, args in instructions if op == "RUN"]
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    torch_step = next(i for i, r in enumerate(runs) if torch_pin in r)
    # The CPU index is the default of a build argument (a local wheel folder can replace it).
    args = [a for op, a in instructions if op == "ARG"]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args
    assert '--index-url "$TORCH_INDEX_URL"' in runs[torch_step]
    # The dependencies come from the lock, every one with its hash, as in scripts/setup.sh.
    deps_step = next(i for i, r in enumerate(runs) if "-r requirements/runtime.lock" in r)
    assert "--require-hashes" in runs[deps_step]
    assert "requirements/runtime.lock ./requirements/" in [a for op, a in instructions if op == "COPY"]
    assert "torch==2.13.0+cpu" in (ROOT / "requirements" / "runtime.lock").read_text()
    project_step = next(
        i for i, r in enumerate(runs) if re.search(r"pip wheel --no-deps --wheel-dir /wheels \.(\s|$)", r)
    )
    assert torch_step < deps_step < project_step, "torch from the CPU index, then the dependencies, then voxserve"
    # The runtime gets the dependencies' venv (cached while pyproject.toml is unchanged) and
    # voxserve's wheel on top, without its dependencies.
    copies = [a for op, a in instructions if op == "COPY"]
    assert "--from=deps /opt/venv /opt/venv" in copies and "--from=build /wheels /tmp/wheels" in copies
    assert any("pip install --no-deps" in r and "/tmp/wheels/*.whl" in r for r in runs)

    assert re.search(r"python:3\.11-slim", DOCKERFILE.read_text())
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    (healthcheck,) = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert "python -m voxserve_common.healthcheck" in healthcheck
    exposed = {int(p) for op, args in instructions if op == "EXPOSE" for p in args.split()}
    assert exposed == {*GRPC_PORT.values(), *METRICS_PORT.values(), GATEWAY_HTTP_PORT, GATEWAY_METRICS_PORT}
    (cmd,) = [json.loads(args) for op, args in instructions if op == "CMD"]
    assert cmd[0] in pyproject["project"]["scripts"]


def test_docker_context_includes_every_package(pyproject: dict[str, Any]) -> None:
    allowed = {
        line[1:].strip("/")
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.parent.name
        for p in ROOT.glob("*/__init__.py")
        if any(re.fullmatch(pat.replace("*", ".*"), p.parent.name) for pat in patterns)
    }
    assert packages and packages <= allowed
    assert "pyproject.toml" in allowed
    readme = pyproject["project"].get("readme")
    if readme:
        assert readme in allowed


def test_healthcheck_module_exists() -> None:
    # The image's HEALTHCHECK, compose healthchecks and deploy/README.md run it.
    assert importlib.util.find_spec("voxserve_common.healthcheck") is not None
