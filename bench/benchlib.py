"""Shared plumbing of the benchmarks: paths, statistics, tables, JSON results, servers.

The loopback hub and the in-process helpers come from the test suite's package
(tests.hubserver, tests.support); benches run as modules from the repo root
(``.venv/bin/python -m bench.bench_<name>``), which puts both packages on the path.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS_DIR = BENCH / "results"

TINY_REPO = "bench-org/faster-whisper-tiny.en"
TINY_MODEL_ID = "bench-tiny"


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """median, min, max, p10/p90 (and p99 when there are many), mean, stdev, spread in %."""
    data = [float(v) for v in values]
    if not data:
        return {"n": 0}
    median = statistics.median(data)
    out: dict[str, float | int] = {
        "n": len(data),
        "median": median,
        "min": min(data),
        "max": max(data),
        "mean": statistics.fmean(data),
        "stdev": statistics.stdev(data) if len(data) > 1 else 0.0,
        "p10": percentile(data, 10),
        "p90": percentile(data, 90),
    }
    if len(data) >= 50:
        out["p50"] = percentile(data, 50)
        out["p99"] = percentile(data, 99)
    # Spread: half the min-max range relative to the median, the "± x %" of the tables.
    out["spread_pct"] = 100.0 * (out["max"] - out["min"]) / 2 / median if median else 0.0
    return out


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def fmt_s(seconds: float) -> str:
    return f"{seconds:.3f} s"


def fmt_spread(summary: dict[str, Any], scale: float = 1.0, unit: str = "") -> str:
    """'median (min-max)' with a unit, for a summarize() dict."""
    if not summary.get("n"):
        return "-"
    return f"{summary['median'] * scale:.3g}{unit} ({summary['min'] * scale:.3g}-{summary['max'] * scale:.3g})"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table, columns sized to their content."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    print()
    print(title)
    print(line)
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if index == 0:
            print(line)
    print(line)
    sys.stdout.flush()


# --------------------------------------------------------------------------- machine load


def _cpu_line() -> list[int]:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values + [0] * (8 - len(values))


def system_busy_seconds() -> float:
    """CPU seconds all cores ran something since boot (/proc/stat user, nice, system, irq, softirq)."""
    v = _cpu_line()
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """CPU seconds the hypervisor gave to someone else while this VM wanted to run."""
    return _cpu_line()[7] / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU of this process and of its children that have been waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class CpuAudit:
    """How busy the machine was during a run, and how much of that was not us.

    ``foreign_cores`` is the average number of cores other processes kept busy: the
    benches share the machine with whatever else runs, and on 2 cores a test suite
    running next to them moves every figure.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy = system_busy_seconds()
        self.steal = steal_seconds()
        self.own = own_cpu_seconds()

    def result(self) -> dict[str, float]:
        wall = time.monotonic() - self.started
        busy = system_busy_seconds() - self.busy
        own = own_cpu_seconds() - self.own
        return {
            "wall_seconds": wall,
            "machine_busy_cores": busy / wall,
            "bench_cores": own / wall,
            "foreign_cores": max(0.0, busy - own) / wall,
            # A VM's CPU time taken by the hypervisor: the benchmark's cores ran slower.
            "steal_cores": (steal_seconds() - self.steal) / wall,
        }


def wait_for_quiet_machine(
    max_busy_cores: float = 0.25, seconds: float = 3.0, timeout: float = 180.0
) -> dict[str, float]:
    """Wait (up to ``timeout``) until the whole machine stays under ``max_busy_cores`` for
    ``seconds``, so another workload does not leak into the figures; report what was seen."""
    started = time.monotonic()
    quiet_since: float | None = None
    last_busy, last_time = system_busy_seconds(), time.monotonic()
    announced = False
    load = float("nan")
    while time.monotonic() - started < timeout:
        time.sleep(0.5)
        busy, now = system_busy_seconds(), time.monotonic()
        load = (busy - last_busy) / (now - last_time)
        last_busy, last_time = busy, now
        if load <= max_busy_cores:
            quiet_since = quiet_since or now
            if now - quiet_since >= seconds:
                return {"waited_seconds": now - started, "busy_cores": load, "quiet": True}
        else:
            quiet_since = None
            if not announced:
                print(
                    f"machine busy ({load:.2f} cores in use by others); waiting up to {timeout:.0f} s for it to calm down",
                    flush=True,
                )
                announced = True
    print(f"machine still busy after {timeout:.0f} s ({load:.2f} cores); measuring anyway", flush=True)
    return {"waited_seconds": time.monotonic() - started, "busy_cores": load, "quiet": False}


def add_run_options(parser: argparse.ArgumentParser, bench: str) -> None:
    """--wait-quiet and --name, the options every bench takes (see start_run)."""
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to leave the CPU idle (0 = do not wait)",
    )
    parser.add_argument(
        "--name", help=f"result file name under bench/results/ (default {bench}, {bench}_quick with --quick)"
    )


def start_run(args: argparse.Namespace, bench: str) -> tuple[dict[str, float] | None, CpuAudit]:
    """Name the result file (args.name), wait for a quiet machine, start the CPU audit:
    (what the wait saw, or None with --wait-quiet 0; the audit) for write_result."""
    args.name = args.name or (f"{bench}_quick" if args.quick else bench)
    quiet = wait_for_quiet_machine(timeout=args.wait_quiet) if args.wait_quiet > 0 else None
    return quiet, CpuAudit()


# --------------------------------------------------------------------------- results


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    """Where and with what the figures were measured."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gib = int(Path("/proc/meminfo").read_text().split()[1]) / (1 << 20)
    packages = (
        "grpcio",
        "protobuf",
        "faster-whisper",
        "ctranslate2",
        "huggingface_hub",
        "httpx2",
        "av",
        "numpy",
        "onnxruntime",
        "torch",
    )
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {name: _package_version(name) for name in packages},
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def write_result(
    name: str, payload: dict[str, Any], audit: CpuAudit | None = None, quiet: dict[str, float] | None = None
) -> Path:
    """bench/results/<name>.json: the machine, the command, the figures (small, diffable)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    machine = machine_info()
    if quiet is not None:
        machine["before_start"] = rounded(quiet, 3)
    if audit is not None:
        machine["during_run"] = rounded(audit.result(), 3)
        load = machine["during_run"]
        print(
            f"machine during the run: {load['machine_busy_cores']:.2f} cores busy, "
            f"{load['bench_cores']:.2f} of them this bench, {load['foreign_cores']:.2f} other processes; "
            f"{load['steal_cores']:.2f} cores stolen by the hypervisor"
        )
    document = {
        "bench": name,
        "command": _command(),
        "machine": machine,
        **payload,
    }
    path.write_text(json.dumps(document, indent=2, sort_keys=False, default=_json_default) + "\n")
    print(f"\nwrote {path.relative_to(REPO)}")
    return path


def _command() -> str:
    """This run's command line, as typed at the repo root (``-m bench.<name>`` and its arguments)."""
    script = Path(sys.argv[0]).resolve()
    module = ".".join(script.relative_to(REPO).with_suffix("").parts) if script.is_relative_to(REPO) else str(script)
    return " ".join([".venv/bin/python", "-m", module, *[_relative(a) for a in sys.argv[1:]]])


def _relative(arg: str) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(arg).resolve().relative_to(REPO))
    return arg


def _json_default(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def rounded(value: Any, digits: int = 6) -> Any:
    """Round floats inside nested dicts/lists so result files stay small and readable."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"voxserve-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def drop_dirty_pages() -> None:
    """Flush written files so one leg's write-back does not land in the next leg's timing."""
    os.sync()


# --------------------------------------------------------------------------- processes


def wait_serving(
    address: str, timeout: float = 120.0, process: subprocess.Popen[Any] | None = None, log: Path | None = None
) -> None:
    """Poll the gRPC health service until SERVING (or fail with the process's log tail)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server process exited with {process.returncode}: {_tail(log)}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"{address} not SERVING after {timeout} s: {_tail(log)}")


def _tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class ServiceProcess:
    """A voxserve service started with its real entry point (``python -m <module>``)."""

    name: str
    address: str
    process: subprocess.Popen[Any]
    log: Path

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def cpu_seconds(self) -> float:
        """User+system CPU time of the process so far (from /proc)."""
        return process_cpu_seconds(self.process.pid)


def process_cpu_seconds(pid: int) -> float:
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields_[11]) + int(fields_[12])) / ticks


def start_service_process(
    module: str, args: Sequence[str], env: dict[str, str], log: Path, port: int
) -> ServiceProcess:
    """Start ``python -m module args`` with VOXSERVE_* settings in env; wait until SERVING."""
    full_env = {**os.environ, **env}
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port), "--metrics-port", "-1", *args],
        cwd=REPO,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    handle.close()
    address = f"127.0.0.1:{port}"
    service = ServiceProcess(module, address, process, log)
    try:
        wait_serving(address, process=process, log=log)
    except BaseException:
        service.stop()
        raise
    return service


@dataclass
class HubHandle:
    """The loopback hub serving tiny.en, in a child process or in this process."""

    endpoint: str
    stop: Callable[[], None]
    pid: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def configure_hub_sockets(nodelay: bool = True) -> None:
    """Turn Nagle's algorithm off on the test hub's sockets (TCP_NODELAY, the
    socketserver ``disable_nagle_algorithm`` switch).

    tests/hubserver.py answers with http.server, which writes a response's headers and
    its body in two send() calls. With Nagle on, a small body waits for the ACK of the
    headers, which the client delays by up to 40 ms: every small JSON answer (model_info,
    the tree listing, config.json...) then costs 0 or ~40 ms at random, and a 0.5 s pull
    moves by tens of percent between rounds. Hubs behind real HTTP servers do not do that.
    """
    from tests.hubserver import _Handler

    _Handler.disable_nagle_algorithm = nodelay


def start_hub(mode: str = "process", throttle_bytes_per_second: int | None = None, nodelay: bool = True) -> HubHandle:
    """tests.hubserver.HubServer serving the real tiny.en files as TINY_REPO.

    mode "process" (default) runs it in a child process (bench.hub_process), as a real
    hub is another machine: its HTTP threads then do not share this process's GIL with the
    client being measured. mode "inprocess" runs it on threads of this process.
    nodelay: see configure_hub_sockets.
    """
    if mode == "inprocess":
        from tests.hubserver import HubServer
        from tests.support import tiny_en_files

        configure_hub_sockets(nodelay)
        hub = HubServer()
        hub.start()
        hub.add_repo(TINY_REPO, tiny_en_files())
        if throttle_bytes_per_second:
            hub.throttle(throttle_bytes_per_second)
        return HubHandle(hub.endpoint, hub.stop, None, {"hub": hub})
    if mode != "process":
        raise ValueError(f"hub mode must be 'process' or 'inprocess', not {mode!r}")
    command = [sys.executable, "-m", "bench.hub_process", "--repo-id", TINY_REPO]
    if not nodelay:
        command.append("--nagle")
    if throttle_bytes_per_second:
        command += ["--throttle", str(throttle_bytes_per_second)]
    process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdin is not None
    line = process.stdout.readline()
    if not line:
        process.wait(10)
        raise RuntimeError(f"hub process exited with {process.returncode} before announcing its endpoint")
    endpoint = json.loads(line)["endpoint"]

    def stop() -> None:
        if process.poll() is None:
            assert process.stdin is not None
            with contextlib.suppress(OSError):
                process.stdin.close()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    return HubHandle(endpoint, stop, process.pid)


def tiny_catalog_entry() -> Any:
    """The extra catalog entry the benches pull: tiny.en from the loopback hub."""
    from model_service.catalog import WHISPER_FILES, WHISPER_REQUIRED, CatalogEntry

    return CatalogEntry(
        TINY_MODEL_ID, "whisper", TINY_REPO, "main", WHISPER_FILES, WHISPER_REQUIRED, "tiny.en from the loopback hub"
    )


@dataclass
class InProcessStore:
    """model_service.__main__.start_app on a LoopThread of this process (as tests/conftest.py)."""

    loop_thread: Any
    app: Any
    address: str

    @property
    def store(self) -> Any:
        return self.app.store

    def stop(self) -> None:
        self.loop_thread.run(self.app.stop(0.5), timeout=60)


def start_store_inprocess(
    loop_thread: Any, data_dir: Path, hub_endpoint: str | None, import_embedded: bool = False, **overrides: Any
) -> InProcessStore:
    from model_service.__main__ import start_app
    from model_service.config import ModelStoreConfig

    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": -1,
        "data_dir": data_dir,
        "hub_endpoints": (hub_endpoint,) if hub_endpoint else (),
        "import_embedded": import_embedded,
        "log_format": "json",
    }
    settings.update(overrides)
    config = ModelStoreConfig(**settings)
    config.validate()
    app = loop_thread.run(start_app(config, {TINY_MODEL_ID: tiny_catalog_entry()} if hub_endpoint else None))
    app.store.scan_done.wait(60)
    return InProcessStore(loop_thread, app, f"127.0.0.1:{app.port}")


def wait_model_ready(address: str, model_id: str, timeout: float = 120.0) -> None:
    """Poll the store's GetModel until the model is READY (e.g. the embedded import)."""
    from voxserve.modelstore.v1 import modelstore_pb2 as pb
    from voxserve.modelstore.v1 import modelstore_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ModelStoreStub(channel)
        state = None
        while time.monotonic() < deadline:
            state = stub.GetModel(pb.GetModelRequest(model_id=model_id), timeout=10).state
            if state == pb.READY:
                return
            time.sleep(0.1)
    raise RuntimeError(f"{model_id} not READY in the store at {address} after {timeout} s (state {state})")


def load_whisper(model_dir: Path | str, **options: Any) -> Any:
    """faster-whisper's ``WhisperModel(model_dir, **options)``, loaded as the service loads it: on
    a thread that ends with the load. Loaded on a thread that lives on (this one), the load's
    OpenMP team stays, libgomp throttles every team in the process, and the 2-thread decoder calls
    take 2.0-2.4x as long on 2 cores (docs/performance.md, "OpenMP teams left by a load")."""
    from faster_whisper import WhisperModel

    from inference_service.engines.device import on_passing_thread

    return on_passing_thread(lambda: WhisperModel(str(model_dir), **options), name="bench-load")
