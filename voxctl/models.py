"""``voxctl models ...``: the model store's catalog, downloads, checks and event feed."""

from __future__ import annotations

import argparse
import os
import time

import grpc

from voxctl.formats import human_duration, human_rate, human_size
from voxctl.output import message_to_dict, print_json, print_json_line, render_table
from voxctl.progress import StatusLine, bar
from voxctl.rpc import CliError, Session, error_code, status_line
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve_common.kinds import ModelKind
from voxserve_common.tracing import trace_metadata

KINDS: dict[ModelKind, pb.ModelKind] = {
    ModelKind.WHISPER: pb.WHISPER,
    ModelKind.VAD: pb.VAD,
    ModelKind.DEMUCS: pb.DEMUCS,
    ModelKind.DIARIZATION: pb.DIARIZATION,
}
RECONNECT_MAX_SECONDS = 5.0


def kind_name(kind: int) -> str:
    return str(pb.ModelKind.Name(kind)).lower() if kind else "-"


def state_name(state: int) -> str:
    return str(pb.ModelState.Name(state))


def event_type_name(event_type: int) -> str:
    return str(pb.EventType.Name(event_type))


def cmd_ls(session: Session, args: argparse.Namespace) -> int:
    request = pb.ListModelsRequest(kind=KINDS[ModelKind(args.kind)] if args.kind else pb.MODEL_KIND_UNSPECIFIED)
    response = session.call(session.store().ListModels, request)
    if session.json:
        print_json(message_to_dict(response), session.out)
        return 0
    rows = [
        [
            m.model_id,
            kind_name(m.kind),
            state_name(m.state) + (f" ({m.queue_position})" if m.state == pb.WAITING and m.queue_position else ""),
            human_size(m.size_bytes) if m.size_bytes else "-",
            m.source or "-",
            m.repo_id or "-",
        ]
        for m in response.models
    ]
    session.out.write(render_table(["MODEL", "KIND", "STATE", "SIZE", "SOURCE", "REPO"], rows, right=["SIZE"]))
    return 0


def cmd_get(session: Session, args: argparse.Namespace) -> int:
    model = session.call(session.store().GetModel, pb.GetModelRequest(model_id=args.model_id))
    if session.json:
        print_json(message_to_dict(model), session.out)
        return 0
    revision = model.revision or "-"
    if model.requested_revision and model.requested_revision != model.revision:
        revision += f" (requested {model.requested_revision})"
    details = [
        ("model", model.model_id),
        ("kind", kind_name(model.kind)),
        ("description", model.description),
        ("state", state_name(model.state)),
        ("queue position", str(model.queue_position) if model.queue_position else ""),
        ("error", model.error_message),
        ("repo", model.repo_id),
        ("revision", revision),
        ("source", model.source),
        ("size", f"{human_size(model.size_bytes)} ({human_size(model.bytes_on_disk)} on disk)"),
        ("path", model.local_path),
        ("updated", model.updated_at.ToJsonString() if model.updated_at.seconds else ""),
    ]
    width = max(len(name) for name, _ in details) + 1
    for name, value in details:
        if value:
            session.out.write(f"{name + ':':<{width}} {value}\n")
    if model.files:
        session.out.write("files:\n")
        rows = [
            [f.path, human_size(f.size), f.sha256 or "-", "yes" if f.required else "no", "yes" if f.present else "no"]
            for f in model.files
        ]
        table = render_table(["PATH", "SIZE", "SHA256", "REQUIRED", "PRESENT"], rows, right=["SIZE"])
        session.out.write("".join(f"  {line}\n" for line in table.splitlines()))
    return 0


def pull_status(event: pb.ModelEvent) -> str:
    """The status line for one PullModel / WatchModels event."""
    model_id = event.model_id or "-"
    state = state_name(event.state)
    if event.state == pb.WAITING:
        where = f"queue position {event.queue_position}" if event.queue_position else "queued"
        return f"{model_id} WAITING ({where})"
    if event.state == pb.DOWNLOADING and event.bytes_total:
        fraction = event.bytes_done / event.bytes_total
        parts = [
            f"{model_id} DOWNLOADING {bar(fraction)} {fraction * 100:5.1f}%",
            f"{human_size(event.bytes_done)}/{human_size(event.bytes_total)}",
        ]
        if event.bytes_per_second > 0:
            parts.append(human_rate(event.bytes_per_second))
            parts.append(f"ETA {human_duration(event.eta_seconds)}")
        if event.files_total:
            parts.append(f"file {min(event.files_done + 1, event.files_total)}/{event.files_total}")
        if event.current_file:
            parts.append(event.current_file)
        return "  ".join(parts)
    if event.state == pb.VERIFYING and event.verify_bytes_total:
        parts = [f"{model_id} VERIFYING {bar(verify_fraction(event))} {verify_text(event)}"]
        if event.current_file:
            parts.append(event.current_file)
        return "  ".join(parts)
    if event.state == pb.VERIFYING and event.files_total:
        return f"{model_id} VERIFYING {event.files_done}/{event.files_total} files"
    if event.state == pb.READY and event.bytes_total:
        return f"{model_id} READY {human_size(event.bytes_total)}"
    suffix = f": {event.message}" if event.message else ""
    return f"{model_id} {state}{suffix}"


def verify_fraction(event: pb.ModelEvent) -> float:
    return event.verify_bytes_done / event.verify_bytes_total if event.verify_bytes_total else 1.0


def verify_text(event: pb.ModelEvent) -> str:
    """``verifying 40 %  4.0 MiB/10.0 MiB``: the hashing progress of a VERIFYING event."""
    done, total = event.verify_bytes_done, event.verify_bytes_total
    return f"verifying {verify_fraction(event) * 100:.0f} %  {human_size(done)}/{human_size(total)}"


def cmd_pull(session: Session, args: argparse.Namespace) -> int:
    request = pb.PullModelRequest(model_id=args.model_id, revision=args.revision or "")
    status = StatusLine(session.err)
    call = session.call(session.store().PullModel, request, default_timeout=None)
    last_state = pb.MODEL_STATE_UNSPECIFIED
    try:
        for event in call:
            if session.json:
                print_json_line(message_to_dict(event), session.out)
            if event.type == pb.HEARTBEAT:
                continue
            last_state = event.state
            status.update(pull_status(event), key=(event.state, event.queue_position))
    except KeyboardInterrupt:
        call.cancel()
        status.done()
        session.err.write(
            f"interrupted; the download of {args.model_id} continues on the store "
            f"(`voxctl models cancel {args.model_id}` stops it)\n"
        )
        return 130
    finally:
        status.done()
    if last_state != pb.READY:
        raise CliError(f"pull of {args.model_id} ended in state {state_name(last_state)}")
    if not session.json:
        model = session.call(session.store().GetModel, pb.GetModelRequest(model_id=args.model_id))
        session.out.write(f"{_model_summary(model)}\n")
    return 0


def _model_summary(model: pb.Model) -> str:
    parts = [f"{model.model_id}: {state_name(model.state)}", human_size(model.size_bytes)]
    if model.revision:
        parts.append(f"revision {model.revision[:12]}")
    if model.source:
        parts.append(f"from {model.source}")
    if model.local_path:
        parts.append(f"at {model.local_path}")
    return ", ".join(parts)


def cmd_rm(session: Session, args: argparse.Namespace) -> int:
    model = session.call(session.store().DeleteModel, pb.DeleteModelRequest(model_id=args.model_id))
    if session.json:
        print_json(message_to_dict(model), session.out)
    else:
        session.out.write(f"{model.model_id}: removed (now {state_name(model.state)})\n")
    return 0


def cmd_cancel(session: Session, args: argparse.Namespace) -> int:
    model = session.call(session.store().CancelDownload, pb.CancelDownloadRequest(model_id=args.model_id))
    if session.json:
        print_json(message_to_dict(model), session.out)
    else:
        session.out.write(f"{model.model_id}: download cancelled (now {state_name(model.state)})\n")
    return 0


def cmd_verify(session: Session, args: argparse.Namespace) -> int:
    # Hashing a large model takes a while; no default deadline.
    result = session.call(
        session.store().VerifyModel, pb.VerifyModelRequest(model_id=args.model_id), default_timeout=None
    )
    if session.json:
        print_json(message_to_dict(result), session.out)
        return 0 if result.ok else 1
    for check in result.files:
        if check.ok:
            session.out.write(f"ok      {check.path}\n")
        else:
            session.out.write(f"FAILED  {check.path}: {check.problem or 'failed'}\n")
    failed = sum(not c.ok for c in result.files)
    verdict = "ok" if result.ok else f"NOT OK ({failed} of {len(result.files)} files failed)"
    session.out.write(
        f"{args.model_id}: {verdict}; {len(result.files)} files checked in {result.seconds:.2f} s; "
        f"state {state_name(result.model.state)}\n"
    )
    return 0 if result.ok else 1


def cmd_import(session: Session, args: argparse.Namespace) -> int:
    if args.directory and args.embedded:
        raise CliError("give either DIR or --embedded, not both", exit_code=2)
    # The store resolves the path on its own host; make it absolute here so that
    # `voxctl models import id ./dir` means this working directory when both share a disk.
    source_dir = os.path.abspath(args.directory) if args.directory else ""
    request = pb.ImportModelRequest(model_id=args.model_id, source_dir=source_dir)
    model = session.call(session.store().ImportModel, request, default_timeout=None)
    if session.json:
        print_json(message_to_dict(model), session.out)
    else:
        session.out.write(f"{_model_summary(model)}\n")
    return 0


def watch_line(event: pb.ModelEvent) -> str:
    """One line per WatchModels event: sequence, type, model, state, progress."""
    kind = event_type_name(event.type)
    if event.type == pb.SNAPSHOT_END:
        what = "resync" if event.resync else "snapshot"
        return f"{event.sequence:>8}  {kind:<13} {what} complete; live events follow"
    state = state_name(event.state)
    if event.type == pb.PROGRESS and event.state == pb.VERIFYING and event.verify_bytes_total:
        detail = verify_text(event) + (f" {event.current_file}" if event.current_file else "")
    elif event.type == pb.PROGRESS and event.bytes_total:
        fraction = event.bytes_done / event.bytes_total
        detail = f"{fraction * 100:5.1f}% {human_size(event.bytes_done)}/{human_size(event.bytes_total)}"
        if event.bytes_per_second > 0:
            detail += f" {human_rate(event.bytes_per_second)} ETA {human_duration(event.eta_seconds)}"
        if event.current_file:
            detail += f" {event.current_file}"
    elif event.type == pb.SNAPSHOT:
        detail = f"{human_size(event.bytes_done)}/{human_size(event.bytes_total)} on disk" if event.bytes_total else ""
        if event.message:
            detail = f"{detail} {event.message}".strip()
    else:
        detail = event.message
    if event.state == pb.WAITING and event.queue_position:
        detail = f"queue position {event.queue_position} {detail}".strip()
    if event.resync and event.type == pb.SNAPSHOT:
        detail = f"(resync) {detail}".strip()
    return f"{event.sequence:>8}  {kind:<13} {event.model_id or '-':<20} {state:<14} {detail}".rstrip()


def cmd_watch(session: Session, args: argparse.Namespace) -> int:
    """Follow WatchModels until Ctrl-C, reconnecting on UNAVAILABLE after the last
    sequence seen so no event is lost or repeated across a store restart."""
    after = args.after
    stop_at = time.monotonic() + session.timeout if session.timeout is not None else None
    backoff = 0.5
    store = session.store()
    while True:
        remaining = None if stop_at is None else max(0.0, stop_at - time.monotonic())
        request = pb.WatchModelsRequest(after_sequence=after, model_ids=args.model or [])
        call = store.WatchModels(request, timeout=remaining, metadata=trace_metadata())
        try:
            for event in call:
                backoff = 0.5
                # Snapshot events all carry the snapshot's sequence; only its end marks
                # the point to resume from, so a break mid-snapshot starts it over.
                if event.type in (pb.STATE_CHANGED, pb.PROGRESS, pb.SNAPSHOT_END):
                    after = event.sequence
                if event.type == pb.HEARTBEAT:
                    continue
                if session.json:
                    print_json_line(message_to_dict(event), session.out)
                else:
                    session.out.write(watch_line(event) + "\n")
                    session.out.flush()
            reason = "stream ended"
        except grpc.RpcError as error:
            code = error_code(error)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and stop_at is not None:
                return 0  # --timeout bounds the watch
            if code != grpc.StatusCode.UNAVAILABLE:
                raise
            reason = status_line(error)
        except KeyboardInterrupt:
            call.cancel()
            return 130
        session.err.write(f"watch: {reason}; reconnecting in {backoff:g} s after sequence {after}\n")
        session.err.flush()
        try:
            time.sleep(backoff)
        except KeyboardInterrupt:
            return 130
        backoff = min(backoff * 2, RECONNECT_MAX_SECONDS)


def cmd_pause(session: Session, args: argparse.Namespace) -> int:
    model = session.call(session.store().PauseDownload, pb.PauseDownloadRequest(model_id=args.model_id))
    if session.json:
        print_json(message_to_dict(model), session.out)
    else:
        session.out.write(f"{model.model_id}: paused, {human_size(model.bytes_on_disk)} kept on disk\n")
    return 0


def cmd_resume(session: Session, args: argparse.Namespace) -> int:
    model = session.call(session.store().ResumeDownload, pb.ResumeDownloadRequest(model_id=args.model_id))
    if session.json:
        print_json(message_to_dict(model), session.out)
    else:
        session.out.write(
            f"{model.model_id}: resumed (now {state_name(model.state)}); `voxctl models pull` follows it\n"
        )
    return 0


def cmd_sources(session: Session, args: argparse.Namespace) -> int:
    reply = session.call(session.store().ListSources, pb.ListSourcesRequest())
    if session.json:
        print_json(message_to_dict(reply), session.out)
        return 0
    rows = [
        [
            s.name,
            s.url,
            pb.BreakerState.Name(s.breaker_state),
            str(s.consecutive_failures),
            s.last_success_at.ToDatetime().isoformat(timespec="seconds") if s.HasField("last_success_at") else "-",
            s.last_failure_reason or "-",
        ]
        for s in reply.sources
    ]
    session.out.write(render_table(["NAME", "URL", "BREAKER", "FAILURES", "LAST OK", "LAST FAILURE"], rows) + "\n")
    return 0
