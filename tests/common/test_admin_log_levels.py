"""Admin/SetLogLevel on a real server: a level changes at once, a timed change reverts by
itself, a change on top of a timed one reverts to the original, bad input is
INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest

from voxserve.admin.v1 import admin_pb2 as pb
from voxserve.admin.v1 import admin_pb2_grpc
from voxserve_common.server import start_server

LOGGER = "voxserve.test.admin"


async def _with_admin(body: Callable[[admin_pb2_grpc.AdminStub], Awaitable[None]]) -> None:
    running = await start_server(
        register=lambda server: None, service_names=(), host="127.0.0.1", port=0, rpc_metrics=None
    )
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            await body(admin_pb2_grpc.AdminStub(channel))
    finally:
        await running.stop(None)


async def _wait_level(name: str, level: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while logging.getLogger(name).level != level:
        assert time.monotonic() < deadline, f"{name} stayed at {logging.getLogger(name).level}"
        await asyncio.sleep(0.02)


def test_set_log_level_now_and_for_a_while() -> None:
    target = logging.getLogger(LOGGER)
    target.setLevel(logging.WARNING)

    async def body(stub: admin_pb2_grpc.AdminStub) -> None:
        lasting = await stub.SetLogLevel(pb.SetLogLevelRequest(logger=LOGGER, level="info"))
        assert (lasting.level, lasting.previous_level, lasting.HasField("reverts_at")) == ("INFO", "WARNING", False)
        assert target.level == logging.INFO

        timed = await stub.SetLogLevel(pb.SetLogLevelRequest(logger=LOGGER, level="DEBUG", duration_seconds=0.3))
        assert timed.HasField("reverts_at") and timed.reverts_at.ToSeconds() >= int(time.time())
        assert target.level == logging.DEBUG
        listed = {e.logger: e for e in (await stub.GetLogLevels(pb.GetLogLevelsRequest())).loggers}
        assert listed[LOGGER].level == "DEBUG" and listed[LOGGER].HasField("reverts_at") and "root" in listed
        await _wait_level(LOGGER, logging.INFO)  # reverted by itself to the lasting level

        await stub.SetLogLevel(pb.SetLogLevelRequest(logger=LOGGER, level="DEBUG", duration_seconds=0.3))
        await stub.SetLogLevel(pb.SetLogLevelRequest(logger=LOGGER, level="ERROR", duration_seconds=0.3))
        await _wait_level(LOGGER, logging.INFO)  # to what was there before both timed changes

    asyncio.run(_with_admin(body))


@pytest.mark.parametrize(
    ("logger", "level", "duration", "message"),
    [
        (LOGGER, "verbose", 0, "DEBUG, INFO, WARNING"),
        ("../../etc/passwd", "INFO", 0, "dotted name"),
        ("a" * 300, "INFO", 0, "at most 200"),
        (LOGGER, "INFO", -1, "between 0 and"),
        (LOGGER, "INFO", float("nan"), "between 0 and"),
        (LOGGER, "INFO", 1e12, "between 0 and"),
    ],
)
def test_bad_requests_are_invalid_argument(logger: str, level: str, duration: float, message: str) -> None:
    async def body(stub: admin_pb2_grpc.AdminStub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SetLogLevel(pb.SetLogLevelRequest(logger=logger, level=level, duration_seconds=duration))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (caught.value.details() or "")

    asyncio.run(_with_admin(body))
