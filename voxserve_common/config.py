"""Typed configuration: dataclass defaults < YAML file (--config) < VOXSERVE_* env < flags.

Each service declares a frozen dataclass; ``load_config`` fills it and validates every
value at start-up, so a typo fails fast with a message that names the bad key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

ENV_PREFIX = "VOXSERVE_"

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(key: str, value: Any, annotation: Any, origin_desc: str) -> Any:
    """Turn a YAML/env/flag value into the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        is_none = value is None or (isinstance(value, str) and value.lower() in ("", "none", "null"))
        if is_none and type(None) in args:
            return None
        return _convert(key, value, non_none[0], origin_desc)
    if origin in (tuple, list):
        item_type = args[0] if args else str
        if isinstance(value, str):
            items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, Mapping):  # a YAML mapping for NAME=VALUE entries (log_levels)
            items = [f"{k}={v}" for k, v in value.items()]
        else:
            raise ConfigError(f"{origin_desc} {key}: expected a list, got {value!r}")
        converted = [_convert(key, item, item_type, origin_desc) for item in items]
        return tuple(converted) if origin is tuple else converted
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{origin_desc} {key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{origin_desc} {key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{origin_desc} {key}: expected an integer, got {value!r}") from None
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{origin_desc} {key}: expected a number, got {value!r}") from None
    if annotation is Path:
        return Path(str(value)).expanduser()
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{origin_desc} {key}: expected a string, got {value!r}")
        return str(value)
    if isinstance(value, (Mapping, list)):
        return value
    return value


def check_settings(config: object, rules: list[tuple[bool, str, str]]) -> None:
    """Raise ConfigError for the first (ok, key, rule) whose ok is False, naming the key,
    its value and the rule."""
    for ok, key, rule in rules:
        if not ok:
            raise ConfigError(f"invalid setting {key}={getattr(config, key)!r}: {rule}")


def read_yaml_config(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; ConfigError when the file is missing or not a mapping."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def load_config(
    cls: type[T],
    *,
    yaml_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` from its defaults, then the YAML file, VOXSERVE_* env, then overrides.

    Unknown YAML keys and unconvertible values raise ConfigError naming the key and its
    origin; the dataclass's ``validate()`` (if any) runs last.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}

    if yaml_path is not None:
        for key, value in read_yaml_config(yaml_path).items():
            name = str(key).replace("-", "_")
            if name not in fields:
                known = ", ".join(sorted(fields))
                raise ConfigError(f"config file {yaml_path}: unknown key {key!r} (known keys: {known})")
            values[name] = _convert(name, value, hints[name], f"config file {yaml_path}:")

    for name in fields:
        env_key = ENV_PREFIX + name.upper()
        if env_key in env:
            values[name] = _convert(env_key, env[env_key], hints[name], "environment variable")

    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in fields:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _convert(name, value, hints[name], "flag")

    config = cls(**values)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("auto", "json", "console")


@dataclass(frozen=True)
class ServiceSettings:
    """Settings every voxserve service has, declared and validated once.

    Each service's config subclasses it (and may change a default, e.g. its port); its
    ``validate()`` calls ``common_checks()`` with its own rules.
    """

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = -1  # -1 disables the /metrics endpoint
    grace_seconds: float = 20.0
    log_level: str = "INFO"
    log_format: str = "auto"  # auto: console on a terminal, JSON otherwise
    # Log files: <log_dir>/<service>.log (JSON) and <service>.error.log, rotated by size and
    # time, gzip-compressed, pruned by count and age (docs/logging.md).
    log_dir: Path | None = None
    log_max_bytes: int = 50 << 20
    log_rotate_when: str = "midnight"
    log_backup_count: int = 14
    log_retention_days: float = 30.0
    # Levels of single loggers, e.g. "huggingface_hub=INFO,httpx=DEBUG" or a YAML mapping.
    log_levels: tuple[str, ...] = ()
    # TLS (tls_client_ca adds mutual TLS) and token authentication (docs/security.md).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens: Path | None = None
    insecure: bool = False  # allow a non-loopback bind with neither tokens nor TLS

    def common_checks(self) -> list[tuple[bool, str, str]]:
        return [
            (0 <= self.port <= 65535, "port", "must be 0-65535"),
            (-1 <= self.metrics_port <= 65535, "metrics_port", "must be -1 (off) or 0-65535"),
            (self.grace_seconds >= 0, "grace_seconds", "must be >= 0"),
            (self.log_level.upper() in LOG_LEVELS, "log_level", f"must be one of {', '.join(LOG_LEVELS)}"),
            (self.log_format in LOG_FORMATS, "log_format", "must be auto, json or console"),
            (self.log_max_bytes >= 0, "log_max_bytes", "must be >= 0 (0: no size limit)"),
            (
                self.log_rotate_when in ("", "midnight", "S", "M", "H", "D"),
                "log_rotate_when",
                "must be midnight, S, M, H, D or empty (size only)",
            ),
            (self.log_backup_count >= 0, "log_backup_count", "must be >= 0"),
            (self.log_retention_days >= 0, "log_retention_days", "must be >= 0 (0: keep by count only)"),
            (_levels_valid(self.log_levels), "log_levels", f"must be LOGGER=LEVEL entries, LEVEL one of {LOG_LEVELS}"),
        ]

    def library_levels(self) -> dict[str, str]:
        """log_levels as a mapping of logger name to level."""
        return dict(_level_pair(entry) for entry in self.log_levels)


def _level_pair(entry: str) -> tuple[str, str]:
    name, _, level = entry.partition("=")
    return name.strip(), level.strip().upper()


def _levels_valid(entries: tuple[str, ...]) -> bool:
    return all("=" in e and _level_pair(e)[0] and _level_pair(e)[1] in LOG_LEVELS for e in entries)
