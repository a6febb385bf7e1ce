"""Typed configuration of the model store (flags, VOXSERVE_* env vars, YAML file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from voxserve_common.config import ConfigError, ServiceSettings, check_settings


@dataclass(frozen=True)
class ModelStoreConfig(ServiceSettings):
    port: int = 50051
    metrics_port: int = 9101  # -1 disables the /metrics endpoint
    data_dir: Path = Path("data/models")
    # "URL" or "name=URL" (PullModelRequest.source and ListSources use the name; a plain
    # URL is named "official" for the official hub, else its host). Empty: HF_ENDPOINT if
    # set, then the official hub.
    hub_endpoints: tuple[str, ...] = ()
    hf_token: str | None = None
    catalog_file: Path | None = None
    max_concurrent_downloads: int = 1
    hub_timeout_seconds: float = 10.0
    download_retries: int = 3
    # A hub endpoint with this many consecutive failed requests is skipped for the
    # cool-down, then one half-open probe decides (ListSources shows the breakers).
    breaker_failures: int = 3
    breaker_cooldown_seconds: float = 30.0
    # Queue again, at start-up, the pulls that ran or waited at the last graceful stop.
    resume_downloads_on_start: bool = True
    download_chunk_bytes: int = 1 << 20
    disk_reserve_bytes: int = 0  # keep this much free beyond what a download needs
    heartbeat_seconds: float = 15.0
    event_history: int = 10_000
    progress_events_per_second: float = 10.0
    import_embedded: bool = True  # import packaged models (tiny.en, Silero) at start-up
    # ImportModel reads only inside these directories (symlinks resolved); empty: only
    # the embedded copies can be imported.
    import_roots: tuple[Path, ...] = ()
    max_import_files: int = 1_000
    max_import_bytes: int = 64 << 30
    verify_on_startup: bool = False  # re-hash READY models at start-up, not only sizes

    def validate(self) -> None:
        checks = [
            *self.common_checks(),
            (self.max_concurrent_downloads >= 1, "max_concurrent_downloads", "must be >= 1"),
            (self.hub_timeout_seconds > 0, "hub_timeout_seconds", "must be > 0"),
            (self.download_retries >= 1, "download_retries", "must be >= 1"),
            (self.breaker_failures >= 1, "breaker_failures", "must be >= 1"),
            (self.breaker_cooldown_seconds > 0, "breaker_cooldown_seconds", "must be > 0"),
            (4096 <= self.download_chunk_bytes <= 64 << 20, "download_chunk_bytes", "must be 4 KiB - 64 MiB"),
            (self.disk_reserve_bytes >= 0, "disk_reserve_bytes", "must be >= 0"),
            (self.max_import_files >= 1, "max_import_files", "must be >= 1"),
            (self.max_import_bytes >= 1, "max_import_bytes", "must be >= 1"),
            (all(root.is_absolute() for root in self.import_roots), "import_roots", "must be absolute directories"),
            (self.heartbeat_seconds > 0, "heartbeat_seconds", "must be > 0"),
            (self.event_history >= 10, "event_history", "must be >= 10"),
            (self.progress_events_per_second > 0, "progress_events_per_second", "must be > 0"),
        ]
        check_settings(self, checks)
        for endpoint in self.hub_endpoints:
            name, sep, url = endpoint.partition("=")
            if not sep or "://" in name:
                name, url = "", endpoint
            if sep and not name.strip():
                raise ConfigError(f"invalid setting hub_endpoints: {endpoint!r} has an empty name before '='")
            if not url.strip().startswith(("http://", "https://")):
                raise ConfigError(
                    f"invalid setting hub_endpoints: {endpoint!r} must be URL or name=URL, "
                    "the URL starting with http:// or https://"
                )
        from model_service.store.download.sources import default_sources  # the one parser of endpoint names

        try:
            default_sources(self.hub_endpoints, None)
        except ValueError as error:
            raise ConfigError(f"invalid setting hub_endpoints: {error}") from None
