"""Flag parsing shared by both services' entry points."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TypeVar

from voxserve_common.config import ConfigError, load_config

T = TypeVar("T")


def common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help="YAML file of settings (keys as in the README)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, help="gRPC port")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (-1 disables)")
    parser.add_argument(
        "--log-format", choices=("auto", "json", "console"), help="log line format (auto: console on a terminal)"
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    parser.add_argument("--log-dir", type=Path, help="also write <service>.log and <service>.error.log here (rotated)")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="the certificate's private key (PEM)")
    parser.add_argument(
        "--tls-client-ca", type=Path, metavar="FILE", help="require client certificates signed by this CA (mTLS)"
    )
    parser.add_argument(
        "--auth-tokens", type=Path, metavar="FILE", help="YAML of token sha256 hashes and roles (docs/security.md)"
    )
    parser.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="allow binding a non-loopback address with neither --auth-tokens nor TLS",
    )
    return parser


def config_from_args(cls: type[T], args: argparse.Namespace, overrides: dict[str, Any]) -> T:
    """Load ``cls`` with the parsed flags on top; exit 2 with the message on a bad value."""
    flag_values = {
        "host": args.host,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "log_dir": args.log_dir,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "auth_tokens": args.auth_tokens,
        "insecure": args.insecure,
        **overrides,
    }
    try:
        return load_config(cls, yaml_path=args.config, overrides=flag_values)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
