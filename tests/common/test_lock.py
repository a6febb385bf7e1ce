"""The locks in requirements/ match pyproject.toml, carry hashes, and are what is installed."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)")


def read_lock(name: str) -> dict[str, tuple[Version, int]]:
    """Package -> (pinned version, number of hashes) of one lock file."""
    pins: dict[str, tuple[Version, int]] = {}
    current = ""
    for line in (LOCKS / name).read_text().splitlines():
        match = PIN.match(line)
        if match:
            current = canonicalize_name(match[1])
            pins[current] = (Version(match[2]), 0)
        elif line.strip().startswith("--hash=sha256:") and current:
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
    return pins


def project() -> dict[str, list[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"runtime": data["dependencies"], "test": data["optional-dependencies"]["test"]}


@pytest.mark.parametrize("lock", ["runtime.lock", "test.lock"])
def test_every_pin_is_exact_and_hashed(lock: str) -> None:
    pins = read_lock(lock)
    assert len(pins) > 30
    unhashed = [name for name, (_, hashes) in pins.items() if hashes == 0]
    assert not unhashed, f"{lock}: pins without a hash: {unhashed} (run scripts/lock.sh)"


def test_locks_satisfy_pyproject() -> None:
    deps = project()
    test_pins, runtime_pins = read_lock("test.lock"), read_lock("runtime.lock")
    for lock_name, pins, wanted in [
        ("runtime.lock", runtime_pins, deps["runtime"]),
        ("test.lock", test_pins, deps["runtime"] + deps["test"]),
    ]:
        for spec in wanted:
            requirement = Requirement(spec)
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{requirement.name} is not in {lock_name}: run scripts/lock.sh"
            version = pins[name][0]
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{lock_name} pins {name}=={version}, pyproject.toml asks {spec}: run scripts/lock.sh"
            )
    # The image and CI run the same versions of what they share.
    for name, (version, _) in runtime_pins.items():
        assert test_pins[name][0] == version, f"{name}: runtime.lock {version}, test.lock {test_pins[name][0]}"


def test_generator_is_pinned_exactly() -> None:
    (tools,) = [spec for spec in project()["test"] if Requirement(spec).name == "grpcio-tools"]
    assert re.fullmatch(r"grpcio-tools==[0-9.]+", tools), "the committed generated code is one generator's output"
    assert "torch==2.13.0+cpu" in (LOCKS / "runtime.lock").read_text(), "the CPU build, never CUDA"


def test_installed_environment_is_the_lock() -> None:
    mismatched = {}
    for name, (version, _) in read_lock("test.lock").items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            mismatched[name] = "missing"
            continue
        if installed != version:
            mismatched[name] = f"{installed} installed, {version} locked"
    assert not mismatched, f"the environment differs from requirements/test.lock (run scripts/setup.sh): {mismatched}"
