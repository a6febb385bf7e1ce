"""``voxctl transcribe``, ``ps``, ``load``, ``unload``, ``cache set`` and ``jobs``: the inference service."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from voxctl.formats import WRITERS, TranscriptWriter, human_size, relative_age
from voxctl.output import message_to_dict, print_json, render_table
from voxctl.progress import StatusLine, bar
from voxctl.rpc import CliError, Session, error_code
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve_common.routing import replica_lost

# One Transcribe message up to this size; larger audio goes through TranscribeStream.
SINGLE_REQUEST_MAX_BYTES = 3 << 20
CHUNK_BYTES = 1 << 20
RESUME_TRIES = 3
TASKS = {"transcribe": pb.TRANSCRIBE, "translate": pb.TRANSLATE}


def known_speakers(specs: list[str]) -> list[pb.KnownSpeaker]:
    """``NAME=FILE`` arguments as known speakers with their clips' bytes."""
    speakers = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CliError(
                f"--known-speaker {spec!r}: write NAME=FILE (a short clip of that speaker alone)", exit_code=2
            )
        try:
            with open(path, "rb") as clip:
                speakers.append(pb.KnownSpeaker(name=name, audio=clip.read()))
        except OSError as error:
            raise CliError(f"--known-speaker {name}: cannot read {path}: {error.strerror}") from None
    return speakers


def transcribe_options(args: argparse.Namespace) -> pb.TranscribeOptions:
    minimum = args.speakers if args.speakers else args.min_speakers or 0
    maximum = args.speakers if args.speakers else args.max_speakers or 0
    known = known_speakers(args.known_speaker)
    diarize = bool(args.diarize or minimum or maximum or known or args.diarization_model)
    return pb.TranscribeOptions(
        model_id=args.model or "",
        language=args.language or "",
        task=TASKS[args.task] if args.task else pb.TASK_UNSPECIFIED,
        beam_size=args.beam_size or 0,
        vad_filter=args.vad,
        word_timestamps=args.words,
        initial_prompt=args.initial_prompt or "",
        hotwords=args.hotwords or "",
        separate_model_id=args.separate or "",
        job_id=args.job_id or "",
        diarize=diarize,
        min_speakers=minimum,
        max_speakers=maximum,
        diarization_model_id=args.diarization_model or "",
        known_speakers=known,
    )


def _read_up_to(source: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes; short only at end of input (pipes return partial reads)."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        block = source.read(remaining)
        if not block:
            break
        parts.append(block)
        remaining -= len(block)
    return b"".join(parts)


def _chunks(options: pb.TranscribeOptions, head: bytes, source: BinaryIO) -> Iterator[pb.TranscribeChunk]:
    """1 MiB chunks, the first carrying the options; the rest of the input is read
    lazily, so a long recording is never held in memory whole."""
    pending = head
    first = True
    while True:
        if len(pending) < CHUNK_BYTES:
            pending += _read_up_to(source, CHUNK_BYTES - len(pending))
        if not pending:
            return
        block, pending = pending[:CHUNK_BYTES], pending[CHUNK_BYTES:]
        yield pb.TranscribeChunk(options=options if first else None, audio=block)
        first = False


def _open_input(path: str) -> BinaryIO:
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror or error}") from None


class JobFollower:
    """Renders a job's event stream and survives a broken connection or a lost replica.

    Segments go to stdout as they arrive; progress, language info and the final summary
    go to stderr. When a stream fails with UNAVAILABLE (or a proxy cut it: the replica went
    away, ``replica_lost``) and the job id is known (from ``--job-id`` or any event), the job
    is followed again with ``WatchJob(job_id, after_sequence=last)``; events at or below the
    last sequence seen are skipped, so no segment is lost or printed twice. When the job is
    gone with its replica (WatchJob: NOT_FOUND) and no segment was printed yet, the request
    is sent again (``resubmit``): behind a proxy another replica transcribes it. ``model`` is
    sent as ``x-voxserve-model`` so that a proxy routes WatchJob and CancelJob to the job's replica.
    """

    def __init__(
        self,
        session: Session,
        writer: TranscriptWriter,
        job_id: str = "",
        cancel_on_interrupt: bool = True,
        model: str = "",
        resubmit: Callable[[], Any] | None = None,
    ) -> None:
        self.session = session
        self.cancel_on_interrupt = cancel_on_interrupt
        self.writer = writer
        self.named_job_id = job_id
        self.job_id = job_id
        self.model = model
        self.resubmit = resubmit
        self.last_sequence = 0
        self.segments = 0
        self.completed: pb.Completed | None = None
        self.status = StatusLine(session.err)
        self.call: Any = None
        # The failure that broke the first stream before any event arrived (if the job then
        # proves unknown, it never reached a server: that error is the real cause), and the
        # lost replica a resumed job may have gone with.
        self._unreached: grpc.RpcError | None = None
        self._lost: grpc.RpcError | None = None

    def run(self, start: Callable[[], Any]) -> int:
        tries = 0
        self.call = start()
        try:
            while True:
                try:
                    self._consume(self.call)
                    break
                except grpc.RpcError as error:
                    if tries >= RESUME_TRIES:
                        raise
                    tries += 1
                    self.call = self._recover(error, tries)
        except KeyboardInterrupt:
            self.call.cancel()
            self.status.done()
            if self.cancel_on_interrupt:
                self._cancel_job()
            else:
                self.session.err.write(f"interrupted; job {self.job_id} continues\n")
            return 130
        finally:
            self.status.done()
            self.session.out.flush()
        if self.completed is None:
            raise CliError(f"the event stream of job {self.job_id or '?'} ended before the job completed")
        self.writer.finish()
        self._summary(self.completed)
        return 0

    def _recover(self, error: grpc.RpcError, tries: int) -> Any:
        """The call that takes over from one that failed with ``error``, or ``error`` raised again."""
        code = error_code(error)
        if code == grpc.StatusCode.NOT_FOUND and self._lost is not None and self.segments == 0 and self.resubmit:
            return self._again(self._lost, "the job was lost with its replica", tries)
        if code == grpc.StatusCode.NOT_FOUND and self._unreached is not None and self.last_sequence == 0:
            raise self._unreached from error
        if not replica_lost(error):
            raise error
        if not self.job_id:
            if self.resubmit is None:
                raise error
            return self._again(error, "the call failed before the job started", tries)
        if self.last_sequence == 0 and self._unreached is None:
            self._unreached = error
        self._lost = error
        delay = 0.5 * 2 ** (tries - 1)
        self.status.note(
            f"connection lost ({error.details()}); resuming job {self.job_id} after event "
            f"{self.last_sequence} in {delay:g} s (try {tries}/{RESUME_TRIES})"
        )
        time.sleep(delay)
        self.session.reconnect(self.session.inference_address)
        return self.watch()

    def _again(self, error: grpc.RpcError, why: str, tries: int) -> Any:
        """Send the request again (a new job: the old one is gone)."""
        assert self.resubmit is not None
        delay = 0.5 * 2 ** (tries - 1)
        self.status.note(
            f"{why} ({error.details()}); sending the request again in {delay:g} s (try {tries}/{RESUME_TRIES})"
        )
        time.sleep(delay)
        self.session.reconnect(self.session.inference_address)
        self.job_id, self.last_sequence = self.named_job_id, 0
        self._unreached = self._lost = None
        return self.resubmit()

    def watch(self) -> Any:
        """WatchJob from the last sequence seen."""
        stub = self.session.inference()
        request = pb.WatchJobRequest(job_id=self.job_id, after_sequence=self.last_sequence)
        return self.session.call(stub.WatchJob, request, default_timeout=None, model=self.model)

    def _cancel_job(self) -> None:
        if not self.job_id:
            self.session.err.write("interrupted\n")
            return
        try:
            response = self.session.call(
                self.session.inference().CancelJob, pb.CancelJobRequest(job_id=self.job_id), 5.0, model=self.model
            )
            self.session.err.write(f"interrupted; job {self.job_id} {pb.JobState.Name(response.state)}\n")
        except grpc.RpcError as error:
            self.session.err.write(f"interrupted; could not cancel job {self.job_id}: {error.details()}\n")

    def _consume(self, call: Any) -> None:
        for event in call:
            if event.job_id and not self.job_id:
                self.job_id = event.job_id
            if event.sequence:
                if event.sequence <= self.last_sequence:
                    continue  # replayed by WatchJob after a resume
                self.last_sequence = event.sequence
            self.handle(event)

    def handle(self, event: pb.TranscribeEvent) -> None:
        self.writer.event(message_to_dict(event))
        kind = event.WhichOneof("event")
        if kind == "accepted":
            accepted = event.accepted
            where = f"queued at position {accepted.queue_position}" if accepted.queue_position else "running"
            self.status.update(
                f"job {event.job_id} {where} (model {accepted.model_id or 'default'})",
                key=("accepted", accepted.queue_position),
            )
        elif kind == "progress":
            self.status.update(progress_status(event.progress), key=event.progress.phase)
        elif kind == "info":
            info = event.info
            self.status.note(
                f"language {info.language or '?'} (p={info.language_probability:.2f}), {info.duration:.2f} s of audio"
            )
        elif kind == "segment":
            self.segments += 1
            self.status.clear()
            self.writer.segment(event.segment)
            self.status.restore()
        elif kind == "completed":
            self.completed = event.completed

    def _summary(self, done: pb.Completed) -> None:
        cache = "cache hit" if done.cache_hit else f"cache miss, model load {done.model_load_seconds:.2f} s"
        speakers = f"; {done.speakers} speakers" if done.speakers else ""
        self.session.err.write(
            f"done: {done.audio_seconds:.2f} s of audio in {done.processing_seconds:.2f} s "
            f"(RTF {done.real_time_factor:.3f}); {cache}; {done.segments} segments{speakers}; job {self.job_id}\n"
        )
        self.session.err.flush()


def progress_status(progress: pb.Progress) -> str:
    phase = pb.Phase.Name(progress.phase)
    text = f"{phase:<13} {bar(progress.percent / 100)} {progress.percent:5.1f}%"
    if progress.bytes_total:
        text += f"  {human_size(progress.bytes_done)}/{human_size(progress.bytes_total)}"
    if progress.message:
        text += f"  {progress.message}"
    return text


def cmd_transcribe(session: Session, args: argparse.Namespace) -> int:
    options = transcribe_options(args)
    source = _open_input(args.file)
    try:
        head = _read_up_to(source, SINGLE_REQUEST_MAX_BYTES + 1)
        model = options.model_id

        def start() -> Any:
            stub = session.inference()  # the session's channel now: a resend may have reconnected
            if len(head) <= SINGLE_REQUEST_MAX_BYTES:
                request = pb.TranscribeRequest(options=options, audio=head)
                return session.call(stub.Transcribe, request, default_timeout=None, model=model)
            return session.call(
                stub.TranscribeStream, _chunks(options, head, source), default_timeout=None, model=model
            )

        writer = WRITERS[args.format or ("json" if session.json else "text")](session.out)
        # Audio held whole in one request can be sent again; a stream read from the input cannot.
        resubmit = start if len(head) <= SINGLE_REQUEST_MAX_BYTES else None
        follower = JobFollower(session, writer, job_id=args.job_id or "", model=model, resubmit=resubmit)
        return follower.run(start)
    finally:
        if source is not sys.stdin.buffer:
            source.close()


def cmd_jobs_watch(session: Session, args: argparse.Namespace) -> int:
    writer = WRITERS[args.format or ("json" if session.json else "text")](session.out)
    # Ctrl-C stops watching; it does not cancel a job this command did not start.
    follower = JobFollower(session, writer, job_id=args.job_id, cancel_on_interrupt=False, model=args.model or "")
    follower.last_sequence = args.after
    return follower.run(follower.watch)


def cmd_jobs_cancel(session: Session, args: argparse.Namespace) -> int:
    request = pb.CancelJobRequest(job_id=args.job_id)
    response = session.call(session.inference().CancelJob, request, model=args.model or "")
    if session.json:
        print_json(message_to_dict(response), session.out)
    else:
        session.out.write(f"job {response.job_id or args.job_id}: {pb.JobState.Name(response.state)}\n")
    return 0


def _age(stamp: Timestamp) -> str:
    if not (stamp.seconds or stamp.nanos):
        return "-"
    return relative_age(time.time() - stamp.ToNanoseconds() / 1e9)


def cmd_ps(session: Session, args: argparse.Namespace) -> int:
    stub = session.inference()
    loaded = session.call(stub.ListLoadedModels, pb.ListLoadedModelsRequest())
    stats = session.call(stub.GetCacheStats, pb.GetCacheStatsRequest())
    if session.json:
        print_json({"models": message_to_dict(loaded)["models"], "cache": message_to_dict(stats)}, session.out)
        return 0
    rows = [
        [
            m.model_id,
            m.kind or "-",
            m.device or "-",
            m.compute_type or "-",
            human_size(m.memory_bytes),
            str(m.hits),
            str(m.in_use),
            "yes" if m.pinned else "no",
            _age(m.last_used),
        ]
        for m in loaded.models
    ]
    headers = ["MODEL", "KIND", "DEVICE", "COMPUTE", "MEMORY", "HITS", "IN_USE", "PINNED", "LAST_USED"]
    session.out.write(render_table(headers, rows, right=["MEMORY", "HITS", "IN_USE"]))
    session.out.write(cache_summary(stats) + "\n")
    return 0


def cache_summary(stats: pb.CacheStats) -> str:
    budget = human_size(stats.memory_budget_bytes) if stats.memory_budget_bytes else "unlimited"
    max_models = str(stats.max_models) if stats.max_models else "unlimited"
    return (
        f"cache: {stats.loaded_models} of {max_models} models, {human_size(stats.memory_used_bytes)} of {budget}"
        f" on {stats.device or '?'}; hits {stats.hits}, misses {stats.misses}, evictions {stats.evictions},"
        f" loads {stats.loads} ({stats.load_failures} failed)"
    )


def cmd_load(session: Session, args: argparse.Namespace) -> int:
    # Loading may first pull the model from the store: no default deadline.
    request = pb.LoadModelRequest(model_id=args.model_id, pin=args.pin)
    model = session.call(session.inference().LoadModel, request, default_timeout=None, model=args.model_id)
    if session.json:
        print_json(message_to_dict(model), session.out)
        return 0
    pinned = ", pinned" if model.pinned else ""
    session.out.write(
        f"{model.model_id}: loaded on {model.device or '?'} ({model.compute_type or '?'}), "
        f"{human_size(model.memory_bytes)}{pinned}\n"
    )
    return 0


def cmd_unload(session: Session, args: argparse.Namespace) -> int:
    request = pb.UnloadModelRequest(model_id=args.model_id, force=args.force)
    response = session.call(session.inference().UnloadModel, request, model=args.model_id)
    if session.json:
        print_json(message_to_dict(response), session.out)
    elif response.unloaded:
        session.out.write(f"{response.model_id or args.model_id}: unloaded, freed {human_size(response.freed_bytes)}\n")
    else:
        session.out.write(f"{response.model_id or args.model_id}: was not loaded\n")
    return 0


def int32_arg(text: str) -> int:
    """An argparse type: an integer that fits the proto's int32 (the service checks the range)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not -(2**31) <= value < 2**31:
        raise argparse.ArgumentTypeError(f"{text} is out of range")
    return value


def cmd_cache_set(session: Session, args: argparse.Namespace) -> int:
    """SetCacheLimits: new limits now, idle models evicted to meet them (admin)."""
    if args.max_models is None and not args.memory_budget:
        raise CliError("give --max-models N and/or --memory-budget SIZE (e.g. 2GiB or 60%)", exit_code=2)
    request = pb.SetCacheLimitsRequest(memory_budget=args.memory_budget or "")
    if args.max_models is not None:
        request.max_models = args.max_models
    response = session.call(session.inference().SetCacheLimits, request)
    if session.json:
        print_json(message_to_dict(response), session.out)
        return 0
    stats = response.stats
    evicted = ", ".join(response.evicted_model_ids) or "none"
    session.out.write(
        f"limits: at most {stats.max_models} models, {human_size(stats.memory_budget_bytes)} budget; evicted: {evicted}\n"
    )
    session.out.write(cache_summary(stats) + "\n")
    if stats.loaded_models > stats.max_models or stats.memory_used_bytes > stats.memory_budget_bytes:
        session.err.write(
            "note: models in use or pinned keep the cache over the new limits; "
            "those in use leave when their last request ends, pinned ones when unloaded\n"
        )
    return 0
