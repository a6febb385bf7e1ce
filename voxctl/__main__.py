"""Entry point: ``voxctl`` parses the command line and runs one command against the services."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import grpc

from voxctl import admin, inference, live, logs, models
from voxctl.formats import WRITERS
from voxctl.health import cmd_health
from voxctl.rpc import CliError, Session, command_trace, status_line
from voxserve_common.kinds import ModelKind
from voxserve_common.tls import TlsConfigError, client_tls, read_token_file

DEFAULT_STORE = "127.0.0.1:50051"
DEFAULT_INFERENCE = "127.0.0.1:50052"

Command = Callable[[Session, argparse.Namespace], int]


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # --json and --timeout are accepted before and after the command; the copies on the
    # subcommands default to SUPPRESS so they do not overwrite a value given up front.
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    shared.add_argument(
        "--timeout", type=_positive_float, default=argparse.SUPPRESS, metavar="SECONDS", help="deadline of each call"
    )

    parser = argparse.ArgumentParser(
        prog="voxctl",
        description="Command-line client of the voxserve model store and inference service.",
    )
    _add_connection_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_models(commands, shared)
    _add_inference(commands, shared)
    live.add_parser(commands, shared)
    _add_admin(commands, shared)
    return parser


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """Where the services are and how to reach them (addresses, TLS, token), and the
    output and deadline flags given before the command."""
    parser.add_argument(
        "--store",
        default=os.environ.get("VOXCTL_STORE", DEFAULT_STORE),
        metavar="ADDR",
        help="model store address (env VOXCTL_STORE; default %(default)s)",
    )
    parser.add_argument(
        "--inference",
        default=os.environ.get("VOXCTL_INFERENCE", DEFAULT_INFERENCE),
        metavar="ADDR",
        help="inference service address (env VOXCTL_INFERENCE; default %(default)s)",
    )
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("VOXCTL_TLS_CA"),
        metavar="FILE",
        help="talk TLS, trusting this CA (env VOXCTL_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get("VOXCTL_TLS_CERT"),
        metavar="FILE",
        help="client certificate for mutual TLS (env VOXCTL_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key", default=os.environ.get("VOXCTL_TLS_KEY"), metavar="FILE", help="its key (env VOXCTL_TLS_KEY)"
    )
    parser.add_argument(
        "--token-file",
        default=os.environ.get("VOXCTL_TOKEN_FILE"),
        metavar="FILE",
        help="file holding the bearer token (env VOXCTL_TOKEN_FILE, or the token itself in VOXCTL_TOKEN)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="deadline of each call (default: 30 s for quick calls, none for pulls, streams and loads)",
    )
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output (JSON; one object per line for streams)"
    )


def _add_admin(commands: argparse._SubParsersAction[argparse.ArgumentParser], shared: argparse.ArgumentParser) -> None:
    """health, log-level and logs: the commands about the services rather than their models."""
    health = commands.add_parser("health", parents=[shared], help="check the services with grpc.health.v1")
    which = health.add_mutually_exclusive_group()
    which.add_argument("--store", dest="only", action="store_const", const="store", help="only the model store")
    which.add_argument(
        "--inference", dest="only", action="store_const", const="inference", help="only the inference service"
    )
    health.set_defaults(handler=cmd_health)

    level = commands.add_parser(
        "log-level", parents=[shared], help="set a logger's level on a running service (no args: list them)"
    )
    level.add_argument("logger", metavar="LOGGER", nargs="?", help="dotted logger name; root for the root logger")
    level.add_argument("level", metavar="LEVEL", nargs="?", help="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    level.add_argument(
        "--service", choices=("store", "inference"), default="store", help="which service (default store)"
    )
    level.add_argument(
        "--for", dest="duration", type=admin.parse_duration, metavar="DURATION", help="revert after e.g. 10m"
    )
    level.set_defaults(handler=admin.cmd_log_level)

    logs.add_parser(commands)
    commands.choices["logs"].set_defaults(handler=lambda session, args: logs.run(args, out=session.out))


def _add_models(commands: argparse._SubParsersAction[argparse.ArgumentParser], shared: argparse.ArgumentParser) -> None:
    models_parser = commands.add_parser("models", help="model store: list, pull, verify, import, remove, watch")
    sub = models_parser.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", aliases=["list"], parents=[shared], help="every catalog model with its state")
    ls.add_argument("--kind", choices=sorted(kind.value for kind in ModelKind), help="only models of this kind")
    ls.set_defaults(handler=models.cmd_ls)

    get = sub.add_parser("get", aliases=["show"], parents=[shared], help="one model with its files")
    get.add_argument("model_id", metavar="ID")
    get.set_defaults(handler=models.cmd_get)

    pull = sub.add_parser("pull", parents=[shared], help="download a model, showing progress on stderr")
    pull.add_argument("model_id", metavar="ID")
    pull.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: the catalog's)")
    pull.set_defaults(handler=models.cmd_pull)

    rm = sub.add_parser("rm", aliases=["delete", "remove"], parents=[shared], help="remove a model's files")
    rm.add_argument("model_id", metavar="ID")
    rm.set_defaults(handler=models.cmd_rm)

    verify = sub.add_parser("verify", parents=[shared], help="re-hash a model's files (exit 1 when not ok)")
    verify.add_argument("model_id", metavar="ID")
    verify.set_defaults(handler=models.cmd_verify)

    imp = sub.add_parser(
        "import",
        parents=[shared],
        help="copy a model from a directory on the store's host, or its embedded copy",
    )
    imp.add_argument("model_id", metavar="ID")
    imp.add_argument("directory", metavar="DIR", nargs="?", default="", help="made absolute here; omit for --embedded")
    imp.add_argument("--embedded", action="store_true", help="import the copy bundled with the store")
    imp.set_defaults(handler=models.cmd_import)

    cancel = sub.add_parser("cancel", parents=[shared], help="stop a running or waiting download")
    cancel.add_argument("model_id", metavar="ID")
    cancel.set_defaults(handler=models.cmd_cancel)

    pause = sub.add_parser("pause", parents=[shared], help="pause a download, keeping its bytes (resume continues)")
    pause.add_argument("model_id", metavar="ID")
    pause.set_defaults(handler=models.cmd_pause)

    resume = sub.add_parser("resume", parents=[shared], help="resume a paused download from the bytes on disk")
    resume.add_argument("model_id", metavar="ID")
    resume.set_defaults(handler=models.cmd_resume)

    sources = sub.add_parser("sources", parents=[shared], help="the hub endpoints with their health and breakers")
    sources.set_defaults(handler=models.cmd_sources)

    watch = sub.add_parser("watch", parents=[shared], help="follow model events until Ctrl-C (reconnects)")
    watch.add_argument(
        "--after",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="events after sequence N (default: a snapshot first)",
    )
    watch.add_argument("--model", action="append", metavar="ID", help="only this model (repeatable)")
    watch.set_defaults(handler=models.cmd_watch)


def _add_inference(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], shared: argparse.ArgumentParser
) -> None:
    transcribe = commands.add_parser(
        "transcribe", parents=[shared], help="transcribe an audio file, printing segments as they arrive"
    )
    transcribe.add_argument("file", metavar="FILE", help="audio file, or - for stdin")
    transcribe.add_argument("--model", metavar="ID", help="Whisper model (default: the service's)")
    transcribe.add_argument("--language", metavar="L", help="language code (default: detect)")
    transcribe.add_argument("--task", choices=sorted(inference.TASKS))
    transcribe.add_argument("--beam-size", type=_non_negative_int, metavar="N")
    transcribe.add_argument("--words", action="store_true", help="word timestamps")
    transcribe.add_argument("--vad", action="store_true", help="skip silence with Silero VAD")
    transcribe.add_argument("--separate", metavar="MODEL", help="isolate vocals with this Demucs model first")
    transcribe.add_argument("--initial-prompt", metavar="T")
    transcribe.add_argument("--hotwords", metavar="T")
    transcribe.add_argument("--job-id", metavar="ID", help="client-chosen job id (idempotent retries, resume)")
    transcribe.add_argument("--diarize", action="store_true", help="label who speaks each segment (SPEAKER_00, ...)")
    transcribe.add_argument(
        "--speakers", type=_non_negative_int, metavar="N", help="with --diarize: exactly N speakers (implies --diarize)"
    )
    transcribe.add_argument(
        "--min-speakers", type=_non_negative_int, metavar="N", help="at least N speakers (implies --diarize)"
    )
    transcribe.add_argument(
        "--max-speakers", type=_non_negative_int, metavar="N", help="at most N speakers (implies --diarize)"
    )
    transcribe.add_argument(
        "--diarization-model", metavar="ID", help="speaker-embedding model (default: the service's)"
    )
    transcribe.add_argument(
        "--known-speaker",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="name the speaker whose voice matches FILE (a short clip of them alone); repeatable; implies --diarize",
    )
    transcribe.add_argument("--format", choices=sorted(WRITERS), help="stdout format (default text; json with --json)")
    transcribe.set_defaults(handler=inference.cmd_transcribe)

    ps = commands.add_parser("ps", parents=[shared], help="models loaded in the inference cache")
    ps.set_defaults(handler=inference.cmd_ps)

    load = commands.add_parser("load", parents=[shared], help="load a model into the inference cache")
    load.add_argument("model_id", metavar="ID")
    load.add_argument("--pin", action="store_true", help="never evict it")
    load.set_defaults(handler=inference.cmd_load)

    unload = commands.add_parser("unload", parents=[shared], help="unload a model from the inference cache")
    unload.add_argument("model_id", metavar="ID")
    unload.add_argument("--force", action="store_true", help="even when pinned")
    unload.set_defaults(handler=inference.cmd_unload)

    cache = commands.add_parser("cache", help="the inference cache's limits (voxctl ps shows its stats)")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    cache_set = cache_sub.add_parser(
        "set", parents=[shared], help="change max models and/or the memory budget now, evicting idle models (admin)"
    )
    cache_set.add_argument(
        "--max-models", type=inference.int32_arg, metavar="N", help="most models held in memory at once"
    )
    cache_set.add_argument(
        "--memory-budget", metavar="SIZE", help="memory for loaded models: bytes, 2GiB, 512MiB or a percent (60%%)"
    )
    cache_set.set_defaults(handler=inference.cmd_cache_set)

    jobs = commands.add_parser("jobs", help="follow or cancel transcription jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    watch = jobs_sub.add_parser("watch", parents=[shared], help="a job's events after sequence N, then live ones")
    watch.add_argument("job_id", metavar="JOB_ID")
    watch.add_argument("--after", type=_non_negative_int, default=0, metavar="N")
    watch.add_argument("--format", choices=sorted(WRITERS))
    routed = "the job's model: behind a proxy that routes by model, the call reaches the job's replica"
    watch.add_argument("--model", metavar="ID", help=routed)
    watch.set_defaults(handler=inference.cmd_jobs_watch)
    cancel = jobs_sub.add_parser("cancel", parents=[shared], help="cancel a queued or running job")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument("--model", metavar="ID", help=routed)
    cancel.set_defaults(handler=inference.cmd_jobs_cancel)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (argparse raises SystemExit(2) on bad usage)."""
    args = build_parser().parse_args(argv)
    try:
        tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)
        token = read_token_file(args.token_file) if args.token_file else os.environ.get("VOXCTL_TOKEN") or None
    except TlsConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    session = Session(
        args.store,
        args.inference,
        timeout=args.timeout,
        json=args.json,
        out=sys.stdout,
        err=sys.stderr,
        tls=tls,
        token=token,
    )
    handler: Command = args.handler
    with command_trace() as trace_id:
        try:
            return handler(session, args)
        except grpc.RpcError as error:
            session.err.write(f"error: {status_line(error)}\n  (trace_id {trace_id})\n")
            return 1
        except CliError as error:
            session.err.write(f"error: {error}\n")
            return error.exit_code
        except KeyboardInterrupt:
            session.err.write("interrupted\n")
            return 130
        except BrokenPipeError:
            # The reader of stdout went away (`voxctl models ls | head -1`): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
        finally:
            session.close()


if __name__ == "__main__":
    sys.exit(main())
