"""Several inference replicas on loopback for the routing tests and bench/bench_routing.py: dev secrets,
replica processes serving mutual TLS, a store catalog with one tiny.en per model id, and a Zipf-like
workload of Transcribe calls that resends a call whose replica was lost."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from model_service.catalog import WHISPER_FILES, WHISPER_REQUIRED, CatalogEntry
from tests.proxies import haproxy_secrets
from tests.support import REPO_ROOT, TINY_REPO, free_port, tiny_en_files, wait_for
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.inference.v1 import inference_pb2_grpc as pb_grpc
from voxserve_common.routing import REPLICA_HEADER, model_metadata, replica_lost
from voxserve_common.tls import ClientTls, open_channel

SERVICE = "voxserve.inference.v1.Inference"
# Six ids for the same tiny.en files. On HAProxy's ring (deploy/haproxy/haproxy.cfg: sdbm
# avalanche, weight 100, servers replica1-3) they spread two per replica: each replica's cache
# of two holds the models routed to it (the routing test checks the spread first).
MODELS = tuple(f"whisper-tiny-{i}" for i in range(1, 7))
ZIPF_EXPONENT = 1.1  # model k (1-based) is asked for in proportion to 1 / k^1.1: 40 % for the first


def routing_catalog(models: Sequence[str] = MODELS) -> dict[str, CatalogEntry]:
    """One Whisper entry per id, each importable from the packaged tiny.en with no network."""
    return {
        model_id: CatalogEntry(
            model_id, "whisper", TINY_REPO, "main", WHISPER_FILES, WHISPER_REQUIRED, "tiny.en", tiny_en_files()
        )
        for model_id in models
    }


def make_secrets(directory: Path) -> Path:
    """scripts/make_dev_secrets.sh into ``directory`` (CA, certificates, tokens), as deployed."""
    script = REPO_ROOT / "scripts" / "make_dev_secrets.sh"
    subprocess.run(["bash", str(script), str(directory)], check=True, timeout=120, capture_output=True)
    return haproxy_secrets(directory)


def client_tls(secrets: Path) -> ClientTls:
    """voxctl's client certificate: what a backend calling the services presents."""
    return ClientTls(secrets / "ca.pem", secrets / "voxctl.pem", secrets / "voxctl.key")


class Replica:
    """``python -m inference_service`` on 127.0.0.1:port with mutual TLS, no preload, one CPU thread.

    ``start()`` again after ``kill()`` restarts it on the same port with an empty cache.
    """

    def __init__(
        self, tmp_path: Path, name: str, store: str, secrets: Path, max_models: int = 2, warmup: bool = False
    ) -> None:
        self.name = name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tmp_path = tmp_path
        self.store = store
        self.secrets = secrets
        self.max_models = max_models
        self.warmup = warmup
        self.process: subprocess.Popen[bytes] | None = None
        self.channel = open_channel(self.address, client_tls(secrets))
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        args = [
            sys.executable, "-m", "inference_service",
            "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", "-1",
            "--model-store", self.store,
            "--cache-dir", str(self.tmp_path / f"{self.name}-cache"),
            "--max-models", str(self.max_models),
            "--tls-cert", str(self.secrets / "server.pem"), "--tls-key", str(self.secrets / "server.key"),
            "--tls-client-ca", str(self.secrets / "ca.pem"),
            "--log-format", "json",
        ]  # fmt: skip
        env = {
            **os.environ,
            "VOXSERVE_PRELOAD": "",
            "VOXSERVE_PIN": "",
            "VOXSERVE_WARMUP": "true" if self.warmup else "false",
            # The routing figures count the routed Whisper models: the fast first segment's VAD
            # model would be one more load on every replica and take one of its max_models slots.
            "VOXSERVE_FAST_FIRST_SEGMENT": "false",
            "VOXSERVE_CPU_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "VOXSERVE_DEFAULT_MODEL": MODELS[0],
        }
        log = self.tmp_path / f"{self.name}-{self.starts}.log"
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)

    def serving(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"replica {self.name} is not running: {self.log()[-2000:]}")
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, timeout: float = 120) -> None:
        wait_for(self.serving, timeout=timeout, interval=0.2, message=f"replica {self.name} SERVING")

    def log(self) -> str:
        return (self.tmp_path / f"{self.name}-{self.starts}.log").read_text(errors="replace")

    def stats(self) -> pb.CacheStats:
        return self.stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=10)

    def loaded(self) -> set[str]:
        return {m.model_id for m in self.stub.ListLoadedModels(pb.ListLoadedModelsRequest(), timeout=10).models}

    def unload_all(self) -> None:
        for model_id in self.loaded():
            self.stub.UnloadModel(pb.UnloadModelRequest(model_id=model_id), timeout=30)

    def kill(self) -> None:
        """SIGKILL, like a crash or an OOM kill."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def close(self) -> None:
        self.channel.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_replicas(tmp_path: Path, count: int, store: str, secrets: Path, **settings: object) -> list[Replica]:
    replicas = [Replica(tmp_path, f"replica{i}", store, secrets, **settings) for i in range(1, count + 1)]  # type: ignore[arg-type]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.wait_ready()
    return replicas


# ------------------------------------------------------------------------------ the workload


def zipf_models(count: int, seed: int, models: Sequence[str] = MODELS) -> list[str]:
    """``count`` model ids drawn with weights 1 / k^ZIPF_EXPONENT (a few hot models, a long tail)."""
    weights = [1 / k**ZIPF_EXPONENT for k in range(1, len(models) + 1)]
    return random.Random(seed).choices(list(models), weights=weights, k=count)


@dataclass(frozen=True)
class CallResult:
    model: str
    replica: str  # from the proxy's x-voxserve-replica header
    attempts: int  # 1, or more when the replica was lost and the call was sent again
    cache_hit: bool
    text: str
    seconds: float  # the whole call, attempts included


def transcribe_routed(
    stub: pb_grpc.InferenceStub, audio: bytes, model: str, retries: int = 3, timeout: float = 120
) -> CallResult:
    """One Transcribe through a proxy with the routing header; sent again (up to ``retries``
    times) when its replica was lost (``replica_lost``): what a client library does."""
    # Greedy decoding: the cheapest real transcription; routing is what is measured.
    request = pb.TranscribeRequest(audio=audio, options=pb.TranscribeOptions(model_id=model, beam_size=1))
    started = time.perf_counter()
    for attempt in range(1, retries + 2):
        call = stub.Transcribe(request, metadata=model_metadata(model), timeout=timeout)
        try:
            events = list(call)  # to its end: the proxy counts a call in flight until then
        except grpc.RpcError as error:
            if attempt > retries or not replica_lost(error):
                raise
            time.sleep(0.2 * attempt)
            continue
        completed = next(e.completed for e in events if e.WhichOneof("event") == "completed")
        replica = dict(call.initial_metadata()).get(REPLICA_HEADER, "")
        seconds = time.perf_counter() - started
        return CallResult(model, str(replica), attempt, completed.cache_hit, completed.text, seconds)
    raise AssertionError("unreachable")


def run_workload(
    stub: pb_grpc.InferenceStub,
    audio: bytes,
    models: Sequence[str],
    before_call: Callable[[int, str], None] | None = None,
) -> list[CallResult]:
    """The calls one after another (``before_call(index, model)`` first, for fault injection)."""
    results = []
    for index, model in enumerate(models):
        if before_call is not None:
            before_call(index, model)
        results.append(transcribe_routed(stub, audio, model))
    return results


def owner(stub: pb_grpc.InferenceStub, model: str) -> str:
    """The replica the proxy routes ``model`` to now, asked with a call that loads nothing
    (ListLoadedModels carrying the routing header)."""
    _, call = stub.ListLoadedModels.with_call(pb.ListLoadedModelsRequest(), metadata=model_metadata(model), timeout=10)
    return str(dict(call.initial_metadata()).get(REPLICA_HEADER, ""))


@dataclass(frozen=True)
class CacheCounts:
    hits: int
    misses: int
    loads: int

    def __sub__(self, other: CacheCounts) -> CacheCounts:
        return CacheCounts(self.hits - other.hits, self.misses - other.misses, self.loads - other.loads)

    @property
    def hit_ratio(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


def cache_counts(replicas: Sequence[Replica]) -> dict[str, CacheCounts]:
    """Each replica's cache counters (GetCacheStats, asked directly)."""
    counts = {}
    for replica in replicas:
        stats = replica.stats()
        counts[replica.name] = CacheCounts(stats.hits, stats.misses, stats.loads)
    return counts


def total(counts: dict[str, CacheCounts]) -> CacheCounts:
    return CacheCounts(*(sum(getattr(c, f) for c in counts.values()) for f in ("hits", "misses", "loads")))
