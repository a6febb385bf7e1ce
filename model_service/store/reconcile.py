"""Making records agree with the disk: the start-up scan, orphan clean-up and VerifyModel."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from model_service.errors import ModelBusy, ModelNotReady
from model_service.metrics import ModelStoreMetrics
from model_service.paths import remove_path
from model_service.state import BUSY_STATES, ModelState
from model_service.store.registry import ModelRegistry, ModelView
from model_service.validator import FileCheck, check_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyResult:
    model: ModelView
    ok: bool
    files: tuple[FileCheck, ...]
    seconds: float


class Reconciler:
    """Sets READY / INCOMPLETE / NOT_DOWNLOADED from what is really on disk.

    Every method reads and hashes files: call from a worker thread, not the event loop.
    Models that are downloading are left alone.
    """

    def __init__(self, registry: ModelRegistry, metrics: ModelStoreMetrics) -> None:
        self.registry = registry
        self.metrics = metrics

    def scan(self, deep: bool) -> None:
        """Remove orphaned partials, then check every model (hashes too when ``deep``)."""
        try:
            self.clean_orphans()
        except OSError:  # the models are still checked: their states must come from the disk
            logger.exception("removing orphaned partial files failed")
        for model_id in self.registry.records():
            try:
                self.reconcile(model_id, deep)
            except Exception:
                logger.exception("startup scan failed for a model", extra={"model_id": model_id})

    def reconcile(self, model_id: str, deep: bool) -> None:
        registry = self.registry
        record = registry.record(model_id)
        if record.state in BUSY_STATES or record.state == ModelState.PAUSED:
            return  # a download in progress, or a paused one whose partial files wait
        model_dir = registry.model_dir(model_id)
        has_partials = registry.partial_root(model_id).exists()
        if not record.files:
            present = model_dir.is_dir() and any(p.is_file() for p in model_dir.rglob("*"))
            new_state = ModelState.INCOMPLETE if present or has_partials else ModelState.NOT_DOWNLOADED
        else:
            checks = [check_file(model_dir, f, deep) for f in record.files]
            if all(c.ok for c in checks):
                new_state = ModelState.READY
            elif any(c.ok for c in checks) or has_partials:
                new_state = ModelState.INCOMPLETE
            else:
                new_state = ModelState.NOT_DOWNLOADED
            for check in checks:
                if not check.ok:
                    logger.warning(
                        "file failed start-up check",
                        extra={"model_id": model_id, "file": check.path, "problem": check.problem},
                    )
        with registry.locked():
            current = registry.record(model_id)
            if current.state in BUSY_STATES or current.state in (new_state, ModelState.PAUSED):
                return
            error = current.error if new_state == ModelState.ERROR else ""
            registry.transition(model_id, new_state, message="start-up disk scan", error=error)

    def clean_orphans(self) -> None:
        """Remove partial files nobody can resume: unknown models, no sidecar, stale temp.
        Partial files of downloads queued again at start-up (or running) are left alone."""
        registry = self.registry
        known = registry.records()
        for child in registry.partial_dir.iterdir() if registry.partial_dir.exists() else []:
            if child.name not in known or not child.is_dir():
                logger.info("removing orphaned partial download", extra={"path": str(child)})
                remove_path(child)
                continue
            if registry.record(child.name).state in BUSY_STATES:
                continue
            for path in list(child.rglob("*")):
                if path.is_symlink():
                    path.unlink()
                elif path.name.endswith((".part", ".part.json")) and not _resumable_pair(path):
                    logger.info("removing partial file without its pair", extra={"path": str(path)})
                    remove_path(path)
            for directory in sorted((p for p in child.rglob("*") if p.is_dir()), reverse=True):
                if not any(directory.iterdir()):
                    directory.rmdir()
            if not any(child.iterdir()):
                child.rmdir()  # nothing resumable left: the model must not look INCOMPLETE
        for child in registry.staging_dir.iterdir():
            remove_path(child)
        for stray in registry.data_dir.rglob("*.incomplete"):
            stray.unlink(missing_ok=True)

    def verify(self, model_id: str) -> VerifyResult:
        """Re-hash every file now; READY when all match, INCOMPLETE otherwise.

        Raises ModelBusy while the model downloads, ModelNotReady when it has no files.
        """
        registry = self.registry
        registry.catalog.get(model_id)
        started = time.monotonic()
        record = registry.record(model_id)
        if record.state in BUSY_STATES:
            raise ModelBusy(f"{model_id} is {record.state.value}; verify after the download ends")
        if record.state == ModelState.PAUSED:
            raise ModelBusy(f"{model_id} is PAUSED; ResumeDownload (or CancelDownload) it before verifying")
        if not record.files:
            raise ModelNotReady(
                f"{model_id} has not been downloaded; nothing to verify (PullModel or ImportModel first)"
            )
        checks = tuple(check_file(registry.model_dir(model_id), f, deep=True) for f in record.files)
        ok = all(c.ok for c in checks)
        for check in checks:
            if not check.ok:
                self.metrics.verification_failures.labels(model_id).inc()
        problems = "; ".join(f"{c.path}: {c.problem}" for c in checks if not c.ok)
        with registry.locked():
            registry.transition(
                model_id,
                ModelState.READY if ok else ModelState.INCOMPLETE,
                message="verified" if ok else f"verification failed: {problems}",
                error="" if ok else problems,
            )
            view = registry.view(model_id)
        logger.info("verification result", extra={"model_id": model_id, "ok": ok, "problems": problems})
        return VerifyResult(view, ok, checks, time.monotonic() - started)


def _resumable_pair(path: Path) -> bool:
    """A ``.part`` and its ``.part.json`` sidecar are both regular files (what the store
    writes); anything else in their place, a directory too, is not resumable."""
    part = path if path.name.endswith(".part") else path.with_name(path.name.removesuffix(".json"))
    sidecar = part.with_name(part.name + ".json")
    return all(p.is_file() and not p.is_symlink() for p in (part, sidecar))
