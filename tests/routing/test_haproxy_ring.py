"""deploy/haproxy/haproxy.cfg's rules, seen with three small gRPC servers that answer only grpc.health.v1
(mutual TLS, like the replicas): how ids spread on the ring, the health check that reads NOT_SERVING, what
moves when a replica goes away and comes back, the bounded load, and calls without the routing header.

The real replicas behind the same file are in test_model_routing.py; these run in a second or two."""

from __future__ import annotations

import random
import string
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.proxies import HAProxyProcess, haproxy_config
from tests.replicas import SERVICE, client_tls, make_secrets
from tests.support import free_port, require_tool
from voxserve_common.routing import REPLICA_HEADER, model_metadata
from voxserve_common.tls import open_channel


@pytest.fixture(autouse=True, scope="module")
def _haproxy_installed() -> None:
    require_tool("haproxy")


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReplica:
    """A gRPC server on 127.0.0.1 answering only grpc.health.v1, with the replicas' certificate."""

    def __init__(self, secrets: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        key, cert = (secrets / "server.key").read_bytes(), (secrets / "server.pem").read_bytes()
        self._credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=(secrets / "ca.pem").read_bytes(), require_client_auth=True
        )
        self.start()

    def start(self) -> None:
        self.health = health.HealthServicer()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=8))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_secure_port(self.address, self._credentials)
        self.server.start()
        self.health.set(SERVICE, SERVING)

    def set(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self.health.set(SERVICE, status)

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_secrets(tmp_path_factory.mktemp("ring") / "secrets")


@pytest.fixture
def ring(tmp_path: Path, secrets: Path) -> Iterator[tuple[HAProxyProcess, list[HealthReplica], grpc.Channel]]:
    replicas = [HealthReplica(secrets) for _ in range(3)]
    haproxy = HAProxyProcess(tmp_path, haproxy_config([r.address for r in replicas]), secrets)
    channel = open_channel(haproxy.address, client_tls(secrets))
    try:
        for backend in ("by_model", "by_load"):
            haproxy.wait_status(backend, {f"replica{i}": "UP" for i in (1, 2, 3)})
        yield haproxy, replicas, channel
    finally:
        channel.close()
        haproxy.close()
        for replica in replicas:
            replica.stop()


def served_by(channel: grpc.Channel, model: str | None) -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    metadata = model_metadata(model) if model else []
    _, call = stub.Check.with_call(health_pb2.HealthCheckRequest(service=SERVICE), metadata=metadata, timeout=10)
    return str(dict(call.initial_metadata())[REPLICA_HEADER])


def ids(count: int = 300) -> list[str]:
    rng = random.Random(19)
    sizes = ["tiny", "base", "small", "medium", "large-v3", "distil-large-v3"]
    return [
        f"whisper-{rng.choice(sizes)}{rng.choice(['', '.en'])}-{''.join(rng.choices(string.ascii_lowercase, k=5))}"
        for _ in range(count)
    ]


def placement(channel: grpc.Channel, models: list[str]) -> dict[str, str]:
    return {model: served_by(channel, model) for model in models}


def test_ids_spread_evenly_over_the_replicas(ring: tuple[HAProxyProcess, list[HealthReplica], grpc.Channel]) -> None:
    _, _, channel = ring
    first = placement(channel, ids())
    shares = Counter(first.values())
    assert set(shares) == {"replica1", "replica2", "replica3"}
    assert all(85 <= count <= 115 for count in shares.values()), shares  # a third each, within 15 %
    assert placement(channel, ids()) == first  # the same id, the same replica, every time


def test_a_replica_not_serving_is_taken_out_and_back_moving_only_its_ids(
    ring: tuple[HAProxyProcess, list[HealthReplica], grpc.Channel],
) -> None:
    haproxy, replicas, channel = ring
    models = ids(90)
    first = placement(channel, models)
    replicas[1].set(NOT_SERVING)  # readiness off: starting up, or draining at a graceful stop
    haproxy.wait_status("by_model", {"replica2": "DOWN"})
    haproxy.wait_status("by_load", {"replica2": "DOWN"})
    during = placement(channel, models)
    moved = {m for m in models if during[m] != first[m]}
    assert moved == {m for m in models if first[m] == "replica2"}
    assert "replica2" not in during.values()
    replicas[1].set(SERVING)
    haproxy.wait_status("by_model", {"replica2": "UP"})
    assert placement(channel, models) == first


def test_a_dead_replica_moves_only_its_ids_and_they_come_back(
    ring: tuple[HAProxyProcess, list[HealthReplica], grpc.Channel],
) -> None:
    haproxy, replicas, channel = ring
    models = ids(90)
    first = placement(channel, models)
    replicas[2].stop()  # the process is gone: connections refused
    # Before the check sees it, a call routed there fails to connect and is sent to another replica.
    assert all(served_by(channel, m) != "replica3" for m in models[:10])
    haproxy.wait_status("by_model", {"replica3": "DOWN"})
    during = placement(channel, models)
    assert {m for m in models if during[m] != first[m]} == {m for m in models if first[m] == "replica3"}
    replicas[2].start()  # the same address again
    haproxy.wait_status("by_model", {"replica3": "UP"})
    back = placement(channel, models)
    moved_back = {m for m in models if back[m] != during[m]}
    assert back == first
    assert 0.2 <= len(moved_back) / len(models) <= 0.45  # about 1/3: only the ones that were its


def test_a_hot_model_spills_to_a_second_replica_under_load(
    ring: tuple[HAProxyProcess, list[HealthReplica], grpc.Channel],
) -> None:
    """hash-balance-factor 150: with one call of the model in flight on its replica, that replica
    already has 1.5 x the average, so a second concurrent call goes to the model's next replica;
    one after the other, they all stay on the first."""
    _, _, channel = ring
    model = "whisper-hot"
    home = served_by(channel, model)
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=SERVICE)
    first = stub.Watch(request, metadata=model_metadata(model), timeout=30)  # a stream that stays open
    second = stub.Watch(request, metadata=model_metadata(model), timeout=30)
    try:
        next(first), next(second)
        where = (dict(first.initial_metadata())[REPLICA_HEADER], dict(second.initial_metadata())[REPLICA_HEADER])
    finally:
        first.cancel()
        second.cancel()
    assert where[0] == home and where[1] != home
    assert {served_by(channel, model) for _ in range(5)} == {home}


def test_calls_without_the_header_are_balanced_by_load(
    ring: tuple[HAProxyProcess, list[HealthReplica], grpc.Channel],
) -> None:
    _, _, channel = ring
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=SERVICE)
    streams = [stub.Watch(request, timeout=30) for _ in range(3)]  # three open calls, no header
    try:
        for stream in streams:
            next(stream)
        where = {str(dict(s.initial_metadata())[REPLICA_HEADER]) for s in streams}
    finally:
        for stream in streams:
            stream.cancel()
    assert where == {"replica1", "replica2", "replica3"}  # least connections: one each
