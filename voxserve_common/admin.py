"""gRPC adapter of the Admin service both servers carry (voxserve.admin.v1)."""

from __future__ import annotations

from typing import Any

import grpc

from voxserve.admin.v1 import admin_pb2 as pb
from voxserve.admin.v1 import admin_pb2_grpc as pb_grpc
from voxserve_common.log_levels import LogLevelControl
from voxserve_common.streams import to_timestamp

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name


class AdminServicer(pb_grpc.AdminServicer):
    """Thin adapter over LogLevelControl."""

    def __init__(self, levels: LogLevelControl) -> None:
        self.levels = levels

    async def SetLogLevel(
        self, request: pb.SetLogLevelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetLogLevelResponse:
        change = self.levels.set_level(request.logger, request.level, request.duration_seconds)
        response = pb.SetLogLevelResponse(
            logger=change.logger, level=change.level, previous_level=change.previous_level
        )
        if change.reverts_at is not None:
            response.reverts_at.CopyFrom(to_timestamp(change.reverts_at))
        return response

    async def GetLogLevels(
        self, request: pb.GetLogLevelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetLogLevelsResponse:
        response = pb.GetLogLevelsResponse()
        for name, level, reverts_at in self.levels.levels():
            entry = response.loggers.add(logger=name, level=level)
            if reverts_at is not None:
                entry.reverts_at.CopyFrom(to_timestamp(reverts_at))
        return response
