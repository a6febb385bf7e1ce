"""``python -m voxserve_common.healthcheck HOST:PORT [SERVICE] [--tls-ca FILE ...]``: exit 0 only when SERVING.

Used by container HEALTHCHECKs and compose; asks grpc.health.v1 with a short timeout, over
TLS when a CA is given (``--tls-ca`` or VOXSERVE_HEALTHCHECK_TLS_CA), with a client
certificate when the server requires one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from voxserve_common.tls import ClientTls, TlsConfigError, client_tls, open_channel


def check(
    address: str, service: str = "", timeout: float = 3.0, quiet: bool = False, tls: ClientTls | None = None
) -> bool:
    with open_channel(address, tls) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs package declares no methods on it
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            if quiet:
                return False
            print(f"{address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return False
    serving: bool = response.status == health_pb2.HealthCheckResponse.SERVING
    if not serving and not quiet:
        print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}", file=sys.stderr)
    return serving


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voxserve_common.healthcheck")
    parser.add_argument("address", metavar="HOST:PORT")
    parser.add_argument(
        "service", nargs="?", default="", help='a service name (readiness); "" = the process (liveness)'
    )
    parser.add_argument("--tls-ca", default=os.environ.get("VOXSERVE_HEALTHCHECK_TLS_CA"), metavar="FILE")
    parser.add_argument("--tls-cert", default=os.environ.get("VOXSERVE_HEALTHCHECK_TLS_CERT"), metavar="FILE")
    parser.add_argument("--tls-key", default=os.environ.get("VOXSERVE_HEALTHCHECK_TLS_KEY"), metavar="FILE")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if exit_.code != 0 else 0
    try:
        tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)
        return 0 if check(args.address, args.service, tls=tls) else 1
    except TlsConfigError as error:
        print(f"healthcheck: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
