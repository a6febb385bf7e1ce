"""docker-compose.yml brought up for real with podman (runc) and podman-compose: the model
store, the inference replicas behind HAProxy, the HTTP gateway and Prometheus from images built here
(deploy/podman/build-images.sh: Debian packages, no registry), with the dev secrets of
scripts/make_dev_secrets.sh (mutual TLS, tokens). From the host: health checks over mTLS,
a real transcription of tests/data/speech_short.wav with voxctl (dev client certificate,
ci-bot token), the gateway over HTTPS, Prometheus scraping every target over mTLS; then
``podman stop -t 25`` (a service still running 22 s after SIGTERM gets SIGABRT for a thread
dump first) and the graceful shutdown in their logs and log files.

Run it alone (as root, ~5-10 min the first time, image build included):

    apt-get install -y podman runc podman-compose debootstrap
    .venv/bin/python -m pytest -p no:cacheprovider tests/deploy/test_compose_podman.py -s

It skips, saying what is missing, where podman cannot run containers. Grafana, Tempo, Loki,
promtail and the OpenTelemetry collector are not started (their images cannot be pulled
here and Debian packages none of them): tests/deploy/test_observability_configs.py checks
their configs statically, and this test prints that note.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import wait_for
from voxserve_common.routing import model_metadata
from voxserve_common.tls import ClientTls, open_channel

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/voxserve:podman-test"
PROMETHEUS_IMAGE = "localhost/voxserve-prometheus:2.42"
HAPROXY_IMAGE = "localhost/voxserve-haproxy:2.6"
INFERENCE_SERVICE = "voxserve.inference.v1.Inference"  # its grpc.health.v1 name: SERVING once ready
STARTED = ("model-store", "inference", "haproxy", "http-gateway", "prometheus")
NOT_STARTED = ("otel-collector", "tempo", "loki", "promtail", "grafana")
PODMAN = ["podman", "--runtime", "runc"]
SPEECH = ROOT / "tests" / "data" / "speech_short.wav"
# Image build (minutes on a cold cache) and the stack's start-up take longer than the suite's
# default timeout.
pytestmark = pytest.mark.timeout(3600)
# The services log these on SIGTERM (voxserve_common/server.py serve_until_signal, then
# service.py run_service once the models and the store channel are closed).
SHUTDOWN_LINES = ("shutdown requested", "server stopped", "service closed")


def _why_podman_cannot_run() -> str | None:
    """None when podman can run containers here, else the reason (and the fix)."""
    missing = [tool for tool in ("podman", "runc", "podman-compose", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install -y podman runc podman-compose debootstrap)"
    if os.geteuid() != 0:
        return "rootful podman is needed (the images are built with debootstrap and run as root's podman): run as root"
    probe = subprocess.run([*PODMAN, "info"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return f"podman cannot run here: {probe.stderr.strip()[-300:]}"
    return None


@dataclass
class Stack:
    project: str
    directory: Path
    secrets: Path
    ports: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "VOXSERVE_IMAGE": IMAGE,
            "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
            "HAPROXY_IMAGE": HAPROXY_IMAGE,
            # No collector is started: no exporter, no retry noise.
            "OTEL_TRACES_EXPORTER": "none",
            "VOXSERVE_STORE_HOST_PORT": str(self.ports["store"]),
            "VOXSERVE_INFERENCE_HOST_PORT": str(self.ports["inference"]),
            "VOXSERVE_HTTP_HOST_PORT": str(self.ports["http"]),
            "PROMETHEUS_HOST_PORT": str(self.ports["prometheus"]),
        }
        env.pop("HF_ENDPOINT", None)
        command = ["podman-compose", "-p", self.project, "-f", "docker-compose.yml"]
        command += ["-f", "deploy/podman/compose.test.yml", *args]
        return subprocess.run(command, cwd=self.directory, env=env, capture_output=True, text=True, timeout=timeout)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def podman(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)

    def logs(self, service: str) -> str:
        result = self.podman("logs", self.container(service))
        return result.stdout + result.stderr

    def diagnostics(self) -> str:
        """The last lines of HAProxy's and every inference replica's log, for a call that hung."""
        listed = self.podman("ps", "-a", "--filter", f"name={self.project}_", "--format", "{{.Names}}")
        names = [name for name in listed.stdout.split() if "_inference_" in name or "_haproxy_" in name]
        parts = []
        for name in names:
            result = self.podman("logs", name)
            parts.append(f"--- {name}\n{(result.stdout + result.stderr)[-4000:]}")
        return "\n".join(parts)

    def voxctl(self, *args: str, token: str | None = "ci-bot") -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "voxctl"]
        command += [f"--inference=127.0.0.1:{self.ports['inference']}", f"--store=127.0.0.1:{self.ports['store']}"]
        command += [f"--tls-ca={self.secrets / 'ca.pem'}", f"--tls-cert={self.secrets / 'voxctl.pem'}"]
        command += [f"--tls-key={self.secrets / 'voxctl.key'}"]
        if token:
            command.append(f"--token-file={self.secrets / f'token-{token}'}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOXCTL_")}
        return subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _project_directory(directory: Path) -> Path:
    """docker-compose.yml next to deploy/ whose entries are the repository's, except
    deploy/secrets: this test's own dev secrets (the repository's are left alone)."""
    (directory / "deploy").mkdir(parents=True)
    # A copy: podman-compose resolves a symlinked compose file to the repository, and with it
    # the ./deploy/secrets paths.
    shutil.copy(ROOT / "docker-compose.yml", directory / "docker-compose.yml")
    for entry in (ROOT / "deploy").iterdir():
        if entry.name != "secrets":
            (directory / "deploy" / entry.name).symlink_to(entry)
    secrets = directory / "deploy" / "secrets"
    # --group 10001: the containers run as 10001:10001 and read the keys they are given.
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "make_dev_secrets.sh"), "--group", "10001", str(secrets)],
        check=True,
        timeout=120,
    )
    return secrets


SYSTEM_CONTAINERS_CONF = Path("/etc/containers/containers.conf")
# Podman's default ulimits (nofile 1048576) cannot be set inside these sandboxed VMs: runc
# fails every `podman run` with "error setting rlimit type 7: operation not permitted".
NO_DEFAULT_ULIMITS = "[containers]\ndefault_ulimits = []\n"


@pytest.fixture(scope="module")
def containers_conf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Without a system containers.conf, podman runs this test's containers with the host's
    limits (CONTAINERS_CONF, for the test's podman and podman-compose commands only); a
    machine that has one keeps it (../shared/notes/containers.md says what it needs)."""
    if SYSTEM_CONTAINERS_CONF.exists() or "CONTAINERS_CONF" in os.environ:
        yield
        return
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(NO_DEFAULT_ULIMITS)
    os.environ["CONTAINERS_CONF"] = str(conf)
    try:
        yield
    finally:
        del os.environ["CONTAINERS_CONF"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, containers_conf: None) -> Iterator[Stack]:
    reason = _why_podman_cannot_run()
    if reason:
        pytest.skip(f"the compose stack cannot run here: {reason}")
    begun = time.monotonic()
    build = subprocess.run(
        ["bash", str(ROOT / "deploy" / "podman" / "build-images.sh")],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "VOXSERVE_TEST_IMAGE": IMAGE},
    )
    assert build.returncode == 0, build.stdout + build.stderr
    directory = tmp_path_factory.mktemp("compose")
    stack = Stack(
        project=f"voxserve-test-{os.getpid()}",
        directory=directory,
        secrets=_project_directory(directory),
        ports=dict(zip(("store", "inference", "http", "prometheus"), _free_ports(4), strict=True)),
    )
    stack.timings["image build"] = time.monotonic() - begun
    try:
        begun = time.monotonic()
        up = stack.compose("up", "-d", "--no-build", *STARTED)
        output = up.stdout[-4000:] + up.stderr[-4000:]
        assert up.returncode == 0, output
        stack.timings["compose up"] = time.monotonic() - begun
        for service in STARTED:
            # podman-compose 1.0.3 exits 0 even when a `podman run` failed: check each one.
            running = stack.podman("inspect", "--format", "{{.State.Running}}", stack.container(service))
            assert running.stdout.strip() == "true", (
                f"{service} is not running:\n{output}\n{stack.logs(service)[-3000:]}"
            )
        yield stack
    finally:
        for service in reversed(STARTED):  # whatever the test did not stop already
            stack.podman("stop", "-t", "25", stack.container(service), timeout=60)
        down = stack.compose("down", "-v", timeout=300)
        # podman-compose 1.0.3 leaves the project's network (and, after a failed start, its
        # volumes) behind: remove them so runs do not pile up.
        stack.podman("network", "rm", "-f", f"{stack.project}_default")
        stack.podman("volume", "prune", "-f", "--filter", f"label=io.podman.compose.project={stack.project}")
        timings = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stack.timings.items())
        print(f"\n[compose/podman] {timings}; down: rc {down.returncode}")
        print(
            f"[compose/podman] not started: {', '.join(NOT_STARTED)} (no image registry here and no Debian"
            " package of them); their configs are checked by tests/deploy/test_observability_configs.py"
        )


def _abort_service(stack: Stack, container: str) -> None:
    """SIGABRT to the service process (tini's child; tini, PID 1, does not forward SIGABRT),
    from the host: podman refuses an exec into a container that is being stopped."""
    tini = stack.podman("inspect", "--format", "{{.State.Pid}}", container).stdout.strip()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        if parent == tini:
            os.kill(int(entry.name), signal.SIGABRT)


def _stop(stack: Stack, service: str) -> tuple[float, str]:
    """``podman stop -t 25`` (SIGTERM, SIGKILL after 25 s; a stop, so the restart policy
    leaves the container down). A service still running 22 s after SIGTERM first gets
    SIGABRT, so Python's faulthandler (PYTHONFAULTHANDLER=1 in compose.test.yml) puts every
    thread's stack in its log: the reason it hung is in the failure message."""
    container = stack.container(service)
    started = time.monotonic()
    stop = subprocess.Popen([*PODMAN, "stop", "-t", "25", container], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = stop.communicate(timeout=22)
        note = ""
    except subprocess.TimeoutExpired:
        _abort_service(stack, container)
        _, err = stop.communicate(timeout=60)
        note = " (still running 22 s after SIGTERM: SIGABRT for the thread dump below)"
    took = time.monotonic() - started
    assert stop.returncode == 0, err.decode()
    if err.strip():
        note += f"; podman stop said: {err.decode().strip()!r}"
    return took, note


def _healthy(stack: Stack, service: str) -> bool:
    # podman runs the compose healthcheck (TLS flags and all) on demand: there is no systemd
    # here to run it on its interval.
    return stack.podman("healthcheck", "run", stack.container(service)).returncode == 0


def _routed(stack: Stack) -> bool:
    """HAProxy passes a call to a replica that says SERVING, with the model header (the by-model
    backend) and without it (by load): its own checks have seen a replica UP in both."""
    tls = ClientTls(stack.secrets / "ca.pem", stack.secrets / "voxctl.pem", stack.secrets / "voxctl.key")
    token = (stack.secrets / "token-ci-bot").read_text().strip()
    channel = open_channel(f"127.0.0.1:{stack.ports['inference']}", tls, token)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE)
        for metadata in (model_metadata("whisper-tiny.en"), []):
            reply = health.Check(request, metadata=metadata, timeout=5)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return False
        return True
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def _https_context(stack: Stack) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(stack.secrets / "ca.pem"))
    return context


def _get(url: str, context: ssl.SSLContext | None = None, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def test_compose_stack_with_tls_and_tokens_transcribes_and_stops_gracefully(stack: Stack) -> None:
    begun = time.monotonic()
    # Every service healthy and HAProxy's checks past (until then it answers 503) first:
    # voxctl's resends (3, over 3.5 s) are for a replica lost in a call, not for a stack still
    # starting. A 503 from HAProxy and the resend after it are tested on a real HAProxy in
    # tests/routing/test_model_routing.py.
    for service in ("model-store", "inference", "haproxy", "http-gateway"):
        wait_for(functools.partial(_healthy, stack, service), timeout=300, interval=2, message=f"{service} healthy")
    wait_for(functools.partial(_routed, stack), timeout=120, interval=0.5, message="HAProxy routing to a replica")
    replicas = stack.podman("ps", "--filter", f"name={stack.project}_inference_", "--format", "{{.Names}}")
    assert len(replicas.stdout.split()) == 2, f"two inference replicas: {replicas.stdout}"
    stack.timings["up and healthy"] = time.monotonic() - begun

    # Mutual TLS really is required: the same probe without a client certificate fails.
    bare = stack.podman(
        "exec",
        stack.container("model-store"),
        "python",
        "-m",
        "voxserve_common.healthcheck",
        "--tls-ca=/run/secrets/ca.pem",
        "127.0.0.1:50051",
    )
    assert bare.returncode != 0, "the store accepted a client without a certificate"

    # A real transcription from the host: voxctl with the dev client certificate and the
    # ci-bot token (read + transcribe), through HAProxy (mutual TLS both sides) to the replica
    # that routing picks; the inference service pulls tiny.en from the store with its own
    # certificate and token.
    begun = time.monotonic()
    try:
        done = stack.voxctl("transcribe", str(SPEECH))
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"voxctl transcribe hung for {hung.timeout:g} s: {hung.stderr!r}\n{stack.diagnostics()}")
    stack.timings["first transcription"] = time.monotonic() - begun
    assert done.returncode == 0, done.stdout + done.stderr
    assert "report" in done.stdout.lower() and "office" in done.stdout.lower(), done.stdout
    anonymous = stack.voxctl("transcribe", str(SPEECH), token=None)
    assert anonymous.returncode != 0 and "UNAUTHENTICATED" in anonymous.stdout + anonymous.stderr
    forbidden = stack.voxctl("unload", "whisper-tiny.en")  # admin only
    assert forbidden.returncode != 0 and "PERMISSION_DENIED" in forbidden.stdout + forbidden.stderr

    # The gateway: HTTPS with the dev CA, mTLS to both backends (ready = both SERVING), the
    # caller's token forwarded.
    context = _https_context(stack)
    base = f"https://127.0.0.1:{stack.ports['http']}"
    wait_for(lambda: _get(f"{base}/readyz", context)[0] == 200, timeout=120, interval=1, message="gateway ready")
    token = (stack.secrets / "token-ci-bot").read_text().strip()
    status, models = _get(f"{base}/api/models", context, token)
    assert status == 200, status
    assert "whisper-tiny.en" in json.dumps(models)
    assert _get(f"{base}/api/models", context)[0] == 401, "a call without a token reaches no backend"

    # Prometheus scrapes the three /metrics endpoints over mutual TLS with its own certificate.
    targets_url = f"http://127.0.0.1:{stack.ports['prometheus']}/api/v1/targets"

    seen: list[list[tuple[str, str, str, str]]] = [[]]

    def every_target_up() -> bool:
        """Every target of the wanted jobs up (both inference replicas), each job found; the last
        answer is kept for the failure message (which target, and Prometheus's lastError)."""
        status, body = _get(targets_url)
        targets = body["data"]["activeTargets"] if status == 200 else []
        seen[0] = [(t["labels"]["job"], t["labels"]["instance"], t["health"], t.get("lastError", "")) for t in targets]
        mine = [target for target in seen[0] if target[0] in wanted]
        return {target[0] for target in mine} == wanted and all(target[2] == "up" for target in mine)

    wanted = {"model_service", "inference_service", "http_gateway", "haproxy"}
    try:
        wait_for(every_target_up, timeout=180, interval=2)
    except AssertionError as timed_out:
        raise AssertionError(f"Prometheus targets not all up after 180 s: {seen[0]}") from timed_out

    def inference_targets() -> list[str]:
        status, body = _get(targets_url)
        targets = body["data"]["activeTargets"] if status == 200 else []
        return [t["health"] for t in targets if t["labels"]["job"] == "inference_service"]

    # Every replica found through DNS and scraped.
    wait_for(lambda: inference_targets() == ["up", "up"], timeout=120, interval=2, message="2 inference targets up")

    # Graceful stop: SIGTERM, drain, exit 0, and the shutdown lines in stdout and in the
    # log files promtail would ship.
    begun = time.monotonic()
    for service in ("http-gateway", "haproxy", "inference", "model-store"):
        took, note = _stop(stack, service)
        stack.timings[f"stop {service}"] = took
        state = stack.podman(
            "inspect",
            "--format",
            "{{.State.ExitCode}} {{.State.OOMKilled}} {{.State.Running}}",
            stack.container(service),
        ).stdout.split()
        assert state[2] == "false", f"{service} is running again after its stop"
        assert state[0] == "0", (
            f"{service} exited {state[0]} (OOM killed: {state[1]}) {took:.1f} s after SIGTERM{note}\n"
            f"{stack.logs(service)[-6000:]}"
        )
    stack.timings["graceful stop"] = time.monotonic() - begun
    for service in ("model-store", "inference"):
        logs = stack.logs(service)
        for line in SHUTDOWN_LINES:
            assert f'"message": "{line}"' in logs, f"{service} did not log {line!r}:\n{logs[-3000:]}"
    files = stack.podman(
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        f"{stack.project}_logs:/logs:ro",
        IMAGE,
        "sh",
        "-c",
        # The replicas write to /logs/<container>/ (--log-dir=/var/log/voxserve/{hostname}).
        "cat /logs/model_service.log /logs/*/inference_service.log",
    )
    assert files.returncode == 0, files.stderr
    assert files.stdout.count('"message": "service closed"') >= 2, "the log files end with the shutdown"
