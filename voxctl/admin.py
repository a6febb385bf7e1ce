"""``voxctl log-level``: change a logger's level on a running service, for a while or for good."""

from __future__ import annotations

import argparse
import re

from voxctl.formats import human_duration
from voxctl.output import message_to_dict, print_json
from voxctl.rpc import CliError, Session
from voxserve.admin.v1 import admin_pb2 as pb
from voxserve.admin.v1 import admin_pb2_grpc

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d`` -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 10m, 2h)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def cmd_log_level(session: Session, args: argparse.Namespace) -> int:
    address = session.store_address if args.service == "store" else session.inference_address
    stub = admin_pb2_grpc.AdminStub(session.channel(address))
    if args.level is None:
        levels = session.call(stub.GetLogLevels, pb.GetLogLevelsRequest())
        if session.json:
            print_json(message_to_dict(levels), session.out)
        else:
            for entry in levels.loggers:
                until = (
                    f"  (until {entry.reverts_at.ToDatetime().isoformat(timespec='seconds')}Z)"
                    if entry.HasField("reverts_at")
                    else ""
                )
                session.out.write(f"{entry.logger:<40} {entry.level}{until}\n")
        return 0
    if args.logger is None:
        raise CliError("give LOGGER and LEVEL (or nothing, to list the levels)", exit_code=2)
    request = pb.SetLogLevelRequest(logger=args.logger, level=args.level, duration_seconds=args.duration or 0)
    reply = session.call(stub.SetLogLevel, request)
    if session.json:
        print_json(message_to_dict(reply), session.out)
    else:
        lasting = f" for {human_duration(args.duration)}" if args.duration else ""
        session.out.write(f"{reply.logger}: {reply.previous_level} -> {reply.level}{lasting} on the {args.service}\n")
    return 0
