"""The start-up record: what runs, on what, listening where, with which settings.

On a console it is a banner for people; in JSON it is one structured ``startup`` record
that a log search finds first when something behaves differently after a deploy.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from voxserve_common.redaction import redact_settings

logger = logging.getLogger(__name__)

PACKAGES = ("voxserve", "grpcio", "torch", "ctranslate2", "faster-whisper", "onnxruntime", "huggingface_hub")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit the code runs from: VOXSERVE_GIT_COMMIT (images set it), else git."""
    given = os.environ.get("VOXSERVE_GIT_COMMIT")
    if given:
        return given
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def device_info() -> dict[str, Any]:
    """CPU threads, and GPU names and memory when torch (already imported) sees CUDA."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "machine": platform.machine()}
    torch = sys.modules.get("torch")  # importing torch only for the banner would cost seconds
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpus"] = [
                {
                    "name": torch.cuda.get_device_name(i),
                    "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
                }
                for i in range(torch.cuda.device_count())
            ]
    return info


def startup_record(service: str, addresses: Mapping[str, str], settings: Any) -> dict[str, Any]:
    versions = {name: v for name in PACKAGES if (v := _version(name)) is not None}
    return {
        "service": service,
        "version": versions.get("voxserve"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "versions": versions,
        "device": device_info(),
        "listening": dict(addresses),
        "config": {k: _plain(v) for k, v in redact_settings(settings).items()},
        "pid": os.getpid(),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def banner_lines(record: Mapping[str, Any]) -> Sequence[str]:
    device = record["device"]
    gpus = ", ".join(f"{g['name']} ({g['memory_bytes'] / 2**30:.1f} GiB)" for g in device.get("gpus", []))
    lines = [
        f"{record['service']} {record['version'] or '?'} (commit {record['git_commit'] or 'unknown'}), "
        f"Python {record['python']}, pid {record['pid']}",
        "  " + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if k != "voxserve"),
        f"  device: {gpus or 'CPU'}; {device['cpu_count']} CPUs"
        + (f", torch threads {device['torch_threads']}" if "torch_threads" in device else ""),
        "  listening: " + ", ".join(f"{k} {v}" for k, v in record["listening"].items()),
        "  config:",
    ]
    lines += [f"    {key} = {value}" for key, value in sorted(record["config"].items())]
    return lines


def log_startup(service: str, addresses: Mapping[str, str], settings: Any, console: bool) -> dict[str, Any]:
    """Log the start-up record: a banner on a console, one ``startup`` record in JSON."""
    record = startup_record(service, addresses, settings)
    if console:
        logger.info("startup\n%s", "\n".join(banner_lines(record)))
    else:
        logger.info("startup", extra={"startup": record})
    return record
