"""``voxctl logs``: search both services' JSON log files (plain and rotated .gz) as one.

Records of every file are merged in time order and filtered on their fields (job, trace,
model, level, time, text), the "grep a task id across services" workflow done on
structured data: ``--job`` also takes the records that share a trace id with the job's
(the store's records of the pull a transcription caused carry its trace, not its job id).
``--errors --summary`` groups failures by category and message template.
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import json
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
Record = dict[str, Any]


def log_files(directories: Sequence[Path]) -> list[Path]:
    """Each service's main log and its rotated copies (the .error.log files repeat them)."""
    found: list[Path] = []
    for directory in directories:
        if not directory.is_dir():
            raise FileNotFoundError(f"log directory {directory} does not exist")
        for path in sorted(directory.iterdir()):
            name = path.name
            if ".error.log" in name or not path.is_file():
                continue
            if name.endswith(".log") or (".log." in name and name.endswith(".gz")):
                found.append(path)
    return found


def read_records(path: Path) -> Iterator[Record]:
    """The JSON records of one file in order; lines that are not JSON objects are skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        yield from _parse_lines(handle)


def _parse_lines(lines: Iterable[str]) -> Iterator[Record]:
    for raw in lines:
        line = raw.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


def merged(paths: Sequence[Path]) -> Iterator[Record]:
    """Records of all files in timestamp order (each file is in order already)."""
    streams = [read_records(path) for path in paths]
    yield from heapq.merge(*streams, key=lambda r: str(r.get("timestamp", "")))


def parse_time(text: str, now: datetime | None = None) -> str:
    """An ISO time or a span back from now ("90s", "10m", "2h", "1d") as the logs' ISO form."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        moment = (now or datetime.now(tz=UTC)) - timedelta(**{unit: float(match.group(1))})
    else:
        try:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a time: {text!r} (use ISO 8601 or 30s/10m/2h/1d)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def trace_of(record: Record) -> str | None:
    """The record's trace id; None without one (or with OpenTelemetry's invalid all-zero id)."""
    value = record.get("trace_id")
    return value if isinstance(value, str) and value.strip("0") else None


@dataclass(frozen=True)
class LogFilter:
    job: str | None = None
    trace: str | None = None
    model: str | None = None
    service: str | None = None
    level: str | None = None
    since: str | None = None
    until: str | None = None
    grep: re.Pattern[str] | None = None
    errors: bool = False
    # The trace ids of the job's records (``learn``): a record without a job id in one of
    # them belongs to the job too (the other service's work for the same request).
    job_traces: set[str] = field(default_factory=set, compare=False)

    def learn(self, records: Iterable[Record]) -> None:
        """Remember the trace ids of the job's records among ``records``."""
        if self.job is not None:
            self.job_traces.update(t for r in records if r.get("job_id") == self.job and (t := trace_of(r)))

    def of_job(self, record: Record) -> bool:
        job = record.get("job_id")
        return job == self.job or (job in (None, "") and trace_of(record) in self.job_traces)

    def __call__(self, record: Record) -> bool:
        if self.job is not None and not self.of_job(record):
            return False
        for key, wanted in (("trace_id", self.trace), ("model_id", self.model)):
            if wanted is not None and record.get(key) != wanted:
                return False
        if self.service is not None and record.get("service") != self.service:
            return False
        level = LEVELS.get(str(record.get("level", "")).upper(), 0)
        if self.level is not None and level < LEVELS[self.level]:
            return False
        if self.errors and level < LEVELS["ERROR"] and not record.get("error_category"):
            return False
        stamp = str(record.get("timestamp", ""))
        if (self.since is not None and stamp < self.since) or (self.until is not None and stamp > self.until):
            return False
        return self.grep is None or bool(self.grep.search(json.dumps(record, ensure_ascii=False)))


def format_record(record: Record) -> str:
    """One readable line: time, service, level, logger, message, then ids and extras."""
    shown = {"timestamp", "service", "level", "logger", "message", "module", "function", "line", "exc_info"}
    extras = " ".join(f"{k}={v}" for k, v in record.items() if k not in shown and v not in (None, ""))
    line = (
        f"{record.get('timestamp', '')} {record.get('service', '-'):<17} {record.get('level', '')!s:<7} "
        f"{record.get('logger', '')}: {record.get('message', '')}"
    )
    if extras:
        line += f"  [{extras}]"
    if record.get("exc_info"):
        line += "\n" + str(record["exc_info"])
    return line


# Parts of a message that vary between occurrences of the same failure.
_VARIABLE_PARTS = (
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"\b[0-9a-f]{12,}\b"), "<id>"),
    (re.compile(r"(?<![A-Za-z])/[^\s:;,]+"), "<path>"),
    (re.compile(r"\b\d+(\.\d+)?\b"), "<n>"),
)


def message_template(message: str) -> str:
    """The message with quoted strings, ids, paths and numbers replaced by placeholders."""
    for pattern, placeholder in _VARIABLE_PARTS:
        message = pattern.sub(placeholder, message)
    return message


@dataclass
class ErrorGroup:
    category: str
    template: str
    count: int = 0
    first: str = ""
    last: str = ""
    services: set[str] = field(default_factory=set)
    per_hour: dict[str, int] = field(default_factory=dict)


def summarise_errors(records: Iterable[Record]) -> list[ErrorGroup]:
    """Failures grouped by (category, message template), most frequent first."""
    groups: dict[tuple[str, str], ErrorGroup] = {}
    for record in records:
        category = str(record.get("error_category") or "Internal")
        text = str(record.get("detail") or record.get("error") or record.get("message", ""))
        key = (category, message_template(text))
        group = groups.setdefault(key, ErrorGroup(*key))
        stamp = str(record.get("timestamp", ""))
        group.count += 1
        group.first = min(group.first, stamp) if group.first else stamp
        group.last = max(group.last, stamp)
        group.services.add(str(record.get("service", "")))
        hour = stamp[:13] + ":00Z" if len(stamp) >= 13 else "unknown"
        group.per_hour[hour] = group.per_hour.get(hour, 0) + 1
    return sorted(groups.values(), key=lambda g: (-g.count, g.category, g.template))


def print_summary(groups: Sequence[ErrorGroup], out: IO[str], as_json: bool) -> None:
    for group in groups:
        if as_json:
            row = {
                "category": group.category,
                "template": group.template,
                "count": group.count,
                "first": group.first,
                "last": group.last,
                "services": sorted(group.services),
                "per_hour": group.per_hour,
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            continue
        hours = ", ".join(f"{hour[:13].replace('T', ' ')}h: {n}" for hour, n in sorted(group.per_hour.items()))
        out.write(
            f"{group.count:>6}  {group.category:<18} {group.template}\n"
            f"        first {group.first}  last {group.last}  {'/'.join(sorted(group.services))}  ({hours})\n"
        )


def end_offsets(paths: Iterable[Path]) -> dict[Path, int]:
    """Where each plain log file ends now: ``follow`` prints what is written after that."""
    return {path: path.stat().st_size for path in paths if path.suffix != ".gz"}


def follow(
    paths_of: Any,
    wanted: LogFilter,
    out: IO[str],
    as_json: bool,
    offsets: dict[Path, int],
    poll: float = 0.5,
    stop: threading.Event | None = None,
) -> None:
    """Print records written after ``offsets`` as the files grow (rotation included) until
    interrupted or ``stop`` is set; a line is printed once it is complete."""
    offsets = dict(offsets)
    stop = stop or threading.Event()
    while not stop.is_set():
        written: list[Record] = []
        for path in paths_of():
            if path.suffix == ".gz":
                continue
            size = path.stat().st_size
            start = offsets.get(path, 0)
            if size < start:  # rotated: the file was replaced by a new, shorter one
                start = 0
            if size > start:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    handle.seek(start)
                    chunk = handle.read()
                complete = chunk[: chunk.rfind("\n") + 1]
                offsets[path] = start + len(complete.encode("utf-8"))
                written.extend(_parse_lines(complete.splitlines()))
        wanted.learn(written)
        fresh = sorted((r for r in written if wanted(r)), key=lambda r: str(r.get("timestamp", "")))
        for record in fresh:
            out.write((json.dumps(record, ensure_ascii=False) if as_json else format_record(record)) + "\n")
        out.flush()
        stop.wait(poll)


def add_parser(commands: Any) -> None:
    """Register ``voxctl logs`` on the subcommand parser."""
    logs = commands.add_parser("logs", help="search both services' JSON log files (merged in time order)")
    logs.add_argument(
        "--log-dir",
        dest="log_dirs",
        action="append",
        type=Path,
        metavar="DIR",
        help="a directory of *.log files (repeatable; env VOXCTL_LOG_DIR, colon-separated; default .data/logs)",
    )
    logs.add_argument(
        "--job",
        help="only records of this job_id, and the records without a job id that share a trace id with them "
        "(e.g. the model store's records of the pull the job caused)",
    )
    logs.add_argument("--trace", help="only records of this trace_id")
    logs.add_argument("--model", help="only records of this model_id")
    logs.add_argument("--service", help="only records of this service (model_service, inference_service)")
    logs.add_argument("--level", type=str.upper, choices=list(LEVELS), help="at least this level")
    logs.add_argument("--since", type=parse_time, help="ISO time or a span back from now (30s, 10m, 2h, 1d)")
    logs.add_argument("--until", type=parse_time, help="ISO time or a span back from now")
    logs.add_argument("--grep", type=re.compile, help="regular expression searched in the whole record")
    logs.add_argument("--errors", action="store_true", help="only failures (ERROR and above, failed RPCs)")
    logs.add_argument("--summary", action="store_true", help="with --errors: group by category and message template")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    logs.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the JSON records")


def default_dirs(environ: dict[str, str]) -> list[Path]:
    given = environ.get("VOXCTL_LOG_DIR", "")
    return [Path(p) for p in given.split(":") if p] or [Path(".data/logs")]


def run(args: argparse.Namespace, out: IO[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Run ``voxctl logs`` with parsed arguments; 0 on success, 2 for a bad directory."""
    out = out or sys.stdout
    directories = args.log_dirs or default_dirs(dict(os.environ) if environ is None else environ)
    as_json = bool(getattr(args, "json", False))
    wanted = LogFilter(
        job=args.job,
        trace=args.trace,
        model=args.model,
        service=args.service,
        level=args.level,
        since=args.since,
        until=args.until,
        grep=args.grep,
        errors=args.errors or args.summary,
    )
    try:
        paths = log_files(directories)
    except FileNotFoundError as error:
        print(f"voxctl logs: {error}", file=sys.stderr)
        return 2
    offsets = end_offsets(paths)
    wanted.learn(merged(paths))  # a first pass: the other service may log before the job's first record
    records = (r for r in merged(paths) if wanted(r))
    if args.summary:
        print_summary(summarise_errors(records), out, as_json)
        return 0
    for record in records:
        out.write((json.dumps(record, ensure_ascii=False) if as_json else format_record(record)) + "\n")
    if args.follow:
        try:
            follow(lambda: log_files(directories), wanted, out, as_json, offsets)
        except KeyboardInterrupt:
            return 0
    return 0
