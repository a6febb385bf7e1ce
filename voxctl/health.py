"""``voxctl health``: grpc.health.v1 checks of the services' own service names."""

from __future__ import annotations

import argparse

import grpc
from grpc_health.v1 import health_pb2

from voxctl.output import print_json
from voxctl.rpc import Session, status_line
from voxserve.inference.v1 import inference_pb2
from voxserve.modelstore.v1 import modelstore_pb2

HEALTH_TIMEOUT = 5.0
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
SERVICES = {
    "store": modelstore_pb2.DESCRIPTOR.services_by_name["ModelStore"].full_name,
    "inference": inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
}


def cmd_health(session: Session, args: argparse.Namespace) -> int:
    """One line per service; exit 1 unless every checked service is SERVING."""
    addresses = {"store": session.store_address, "inference": session.inference_address}
    names = [args.only] if args.only else ["store", "inference"]
    results = []
    for name in names:
        # The method health_pb2_grpc.HealthStub builds, made here because its stub declares no methods.
        check = session.channel(addresses[name]).unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            response = session.call(check, health_pb2.HealthCheckRequest(service=SERVICES[name]), HEALTH_TIMEOUT)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        except grpc.RpcError as error:
            status = status_line(error)
        results.append({"name": name, "address": addresses[name], "service": SERVICES[name], "status": status})
    if session.json:
        print_json({"services": results}, session.out)
    else:
        width = max(len(r["name"]) for r in results)
        for r in results:
            session.out.write(f"{r['name']:<{width}}  {r['address']}  {r['status']}\n")
    return 0 if all(r["status"] == "SERVING" for r in results) else 1
