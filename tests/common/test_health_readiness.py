"""Readiness apart from liveness: the service names are NOT_SERVING until the start-up work
is done and while draining; the overall "" status stays SERVING while the process lives."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from voxserve_common.server import start_server

SERVICE = "voxserve.test.v1.Thing"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def statuses(address: str) -> tuple[int, int]:
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        named = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status
    return overall, named


def test_liveness_stays_up_while_readiness_follows_start_up_and_draining() -> None:
    seen: dict[str, tuple[int, int]] = {}

    async def scenario() -> None:
        running = await start_server(
            register=lambda server: None,
            service_names=[SERVICE],
            host="127.0.0.1",
            port=0,
            rpc_metrics=None,
            ready=False,
        )
        seen["starting"] = await asyncio.to_thread(statuses, running.address)
        await running.set_ready(True)
        seen["ready"] = await asyncio.to_thread(statuses, running.address)

        async def while_draining() -> None:
            seen["draining"] = await asyncio.to_thread(statuses, running.address)

        running.on_stop.append(while_draining)
        await running.stop(1)

    asyncio.run(scenario())
    assert seen == {"starting": (SERVING, NOT_SERVING), "ready": (SERVING, SERVING), "draining": (SERVING, NOT_SERVING)}
