"""TLS, mutual TLS (with expired and wrongly signed certificates), certificate rotation,
and bearer tokens with roles, on a real model store server with real certificates."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from model_service.__main__ import SERVICE_NAME, build_store
from model_service.config import ModelStoreConfig
from model_service.servicer import ModelStoreServicer
from tests.support import LoopThread, make_catalog, wait_for
from voxserve.admin.v1 import admin_pb2, admin_pb2_grpc
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2_grpc
from voxserve_common.auth import Authenticator, TokenFileError, load_tokens
from voxserve_common.server import RunningServer, start_server
from voxserve_common.tls import ClientTls, ServerTls, open_channel

TOKENS = {"reader": "tok-read-6b1f0c", "puller": "tok-pull-93ad2e", "ops": "tok-admin-c40e77"}
ROLES = {"reader": ["read"], "puller": ["read", "pull"], "ops": ["admin"]}


@dataclass
class Pki:
    ca: trustme.CA
    directory: Path

    def write(self, name: str, blob: trustme.Blob) -> Path:
        path = self.directory / name
        blob.write_to_path(str(path))
        return path

    def server_files(self, ca: trustme.CA | None = None, prefix: str = "server") -> ServerTls:
        leaf = (ca or self.ca).issue_cert("127.0.0.1", "localhost")
        cert = self.write(f"{prefix}.pem", leaf.cert_chain_pems[0])
        key = self.write(f"{prefix}.key", leaf.private_key_pem)
        return ServerTls(cert, key)

    def client_files(self, name: str, ca: trustme.CA | None = None, **dates: Any) -> ClientTls:
        leaf = (ca or self.ca).issue_cert(f"{name}.clients.voxserve", **dates)
        cert = self.write(f"{name}.pem", leaf.cert_chain_pems[0])
        key = self.write(f"{name}.key", leaf.private_key_pem)
        return ClientTls(self.ca_file, cert, key)

    @property
    def ca_file(self) -> Path:
        path = self.directory / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(trustme.CA(), tmp_path)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.yaml"
    entries = {
        name: {"sha256": hashlib.sha256(t.encode()).hexdigest(), "roles": ROLES[name]} for name, t in TOKENS.items()
    }
    path.write_text(yaml.safe_dump({"tokens": entries}))
    return path


@pytest.fixture
def served_stores() -> list[Any]:
    return []


@pytest.fixture
def serve(
    loop_thread: LoopThread, store_config: ModelStoreConfig, served_stores: list[Any]
) -> Iterator[Callable[..., RunningServer]]:
    """serve(tls=..., authenticator=...): a real model store on 127.0.0.1 with those settings."""
    started: list[tuple[RunningServer, Any]] = []

    def start(**security: Any) -> RunningServer:
        store = build_store(store_config, make_catalog())
        store.start()
        servicer = ModelStoreServicer(store, store_config.heartbeat_seconds)

        async def go() -> RunningServer:
            return await start_server(
                register=lambda s: modelstore_pb2_grpc.add_ModelStoreServicer_to_server(servicer, s),
                service_names=[SERVICE_NAME],
                host="127.0.0.1",
                port=0,
                rpc_metrics=store.metrics.rpc,
                metrics_registry=store.metrics.registry,
                metrics_port=0,
                service_label="model_service",
                **security,
            )

        running = loop_thread.run(go())
        started.append((running, store))
        served_stores.append(store)
        return running

    yield start
    for running, store in started:
        loop_thread.run(running.stop(0))
        store.close()


def list_models(channel: grpc.Channel, timeout: float = 10) -> int:
    return len(modelstore_pb2_grpc.ModelStoreStub(channel).ListModels(pb.ListModelsRequest(), timeout=timeout).models)


def refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_tls_serves_a_trusting_client_and_refuses_plaintext(serve: Callable[..., RunningServer], pki: Pki) -> None:
    running = serve(tls=pki.server_files())
    with open_channel(running.address, ClientTls(pki.ca_file)) as channel:
        assert list_models(channel) > 0
    with grpc.insecure_channel(running.address) as plaintext:
        assert refused(lambda: list_models(plaintext, timeout=5)).code() == grpc.StatusCode.UNAVAILABLE
    stranger = trustme.CA()
    other_ca = pki.write("other-ca.pem", stranger.cert_pem)
    with open_channel(running.address, ClientTls(other_ca)) as untrusting:  # the server's cert is not signed by it
        assert refused(lambda: list_models(untrusting, timeout=5)).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_valid_client_certificate_from_its_ca(serve: Callable[..., RunningServer], pki: Pki) -> None:
    server_tls = pki.server_files()
    running = serve(tls=ServerTls(server_tls.cert, server_tls.key, pki.ca_file))
    with open_channel(running.address, pki.client_files("inference")) as channel:
        assert list_models(channel) > 0
    with open_channel(running.address, ClientTls(pki.ca_file)) as no_cert:
        assert refused(lambda: list_models(no_cert, timeout=5)).code() == grpc.StatusCode.UNAVAILABLE
    wrong = pki.client_files("intruder", ca=trustme.CA())
    with open_channel(running.address, wrong) as wrongly_signed:
        assert refused(lambda: list_models(wrongly_signed, timeout=5)).code() == grpc.StatusCode.UNAVAILABLE
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = pki.client_files("expired", not_before=past, not_after=past + dt.timedelta(days=1))
    with open_channel(running.address, expired) as old:
        assert refused(lambda: list_models(old, timeout=5)).code() == grpc.StatusCode.UNAVAILABLE


def test_a_rotated_certificate_is_served_without_a_restart(serve: Callable[..., RunningServer], pki: Pki) -> None:
    files = pki.server_files()
    running = serve(tls=files)
    with open_channel(running.address, ClientTls(pki.ca_file)) as channel:
        assert list_models(channel) > 0
    new_ca = trustme.CA()
    pki.server_files(ca=new_ca)  # the same file names, now signed by another CA
    new_ca_file = pki.write("new-ca.pem", new_ca.cert_pem)

    def handshake_with_new_ca() -> bool:
        with open_channel(running.address, ClientTls(new_ca_file)) as fresh:
            try:
                return list_models(fresh, timeout=5) > 0
            except grpc.RpcError:
                return False

    # The files are checked at a handshake, at most once a second.
    wait_for(handshake_with_new_ca, timeout=30, interval=0.2, message="the rotated certificate is served")
    with open_channel(running.address, ClientTls(pki.ca_file)) as old_trust:
        assert refused(lambda: list_models(old_trust, timeout=5)).code() == grpc.StatusCode.UNAVAILABLE


def test_metrics_endpoint_serves_https_with_the_same_certificate(serve: Callable[..., RunningServer], pki: Pki) -> None:
    running = serve(tls=pki.server_files())
    assert running.metrics_endpoint is not None
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    with urllib.request.urlopen(f"https://127.0.0.1:{running.metrics_endpoint.port}/metrics", context=context) as reply:
        assert b"voxserve_rpc_requests_total" in reply.read()


def test_a_client_that_never_finishes_its_tls_handshake_stalls_neither_metrics_nor_shutdown(pki: Pki) -> None:
    """A TCP connection to the HTTPS /metrics port that sends nothing (a port scanner, a TCP
    probe, a stuck client) must not block other scrapes or the endpoint's stop."""
    from prometheus_client import CollectorRegistry, Counter

    from voxserve_common.metrics import start_metrics_endpoint

    registry = CollectorRegistry()
    Counter("voxserve_probe", "probe", registry=registry).inc()
    endpoint = start_metrics_endpoint(registry, "127.0.0.1", 0, pki.server_files())
    silent = [socket.create_connection(("127.0.0.1", endpoint.port)) for _ in range(3)]
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        url = f"https://127.0.0.1:{endpoint.port}/metrics"
        for _ in range(3):
            with urllib.request.urlopen(url, context=context, timeout=20) as reply:
                assert b"voxserve_probe_total 1.0" in reply.read()
        stopper = threading.Thread(target=endpoint.stop, daemon=True)
        stopper.start()
        stopper.join(20)
        assert not stopper.is_alive(), "stopping the metrics endpoint hung on a silent connection"
    finally:
        for connection in silent:
            connection.close()


def test_metrics_endpoint_with_a_client_ca_requires_a_client_certificate(pki: Pki) -> None:
    from dataclasses import replace

    from prometheus_client import CollectorRegistry

    from voxserve_common.metrics import start_metrics_endpoint

    tls = replace(pki.server_files(), client_ca=pki.ca_file)
    endpoint = start_metrics_endpoint(CollectorRegistry(), "127.0.0.1", 0, tls)
    url = f"https://127.0.0.1:{endpoint.port}/metrics"
    try:
        anonymous = ssl.create_default_context(cafile=str(pki.ca_file))
        with pytest.raises(OSError):  # the server ends the handshake: no certificate
            urllib.request.urlopen(url, context=anonymous, timeout=20).read()
        client = pki.client_files("scraper")
        known = ssl.create_default_context(cafile=str(pki.ca_file))
        known.load_cert_chain(str(client.cert), str(client.key))
        with urllib.request.urlopen(url, context=known, timeout=20) as reply:
            assert reply.status == 200
    finally:
        endpoint.stop()


def test_tokens_and_roles(
    serve: Callable[..., RunningServer], served_stores: list[Any], tokens_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    authenticator = Authenticator(tokens_file)
    running = serve(authenticator=authenticator)
    with grpc.insecure_channel(running.address) as channel:
        store = modelstore_pb2_grpc.ModelStoreStub(channel)
        admin = admin_pb2_grpc.AdminStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )

        missing = refused(lambda: store.ListModels(pb.ListModelsRequest(), timeout=10))
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in missing.details()
        bad = refused(
            lambda: store.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer nope"),), timeout=10)
        )
        assert bad.code() == grpc.StatusCode.UNAUTHENTICATED

        def as_(name: str) -> tuple[tuple[str, str]]:
            return (("authorization", f"Bearer {TOKENS[name]}"),)

        assert store.ListModels(pb.ListModelsRequest(), metadata=as_("reader"), timeout=10).models
        denied = refused(
            lambda: store.DeleteModel(pb.DeleteModelRequest(model_id="test-tiny"), metadata=as_("reader"), timeout=10)
        )
        assert (
            denied.code() == grpc.StatusCode.PERMISSION_DENIED
            and "'admin'" in denied.details()
            and "'reader'" in denied.details()
        )
        pull = refused(
            lambda: list(store.PullModel(pb.PullModelRequest(model_id="test-tiny"), metadata=as_("reader"), timeout=10))
        )
        assert pull.code() == grpc.StatusCode.PERMISSION_DENIED and "'pull'" in pull.details()
        events = list(store.PullModel(pb.PullModelRequest(model_id="test-tiny"), metadata=as_("puller"), timeout=120))
        assert events[-1].state == pb.READY
        level = refused(
            lambda: admin.SetLogLevel(
                admin_pb2.SetLogLevelRequest(logger="x", level="INFO"), metadata=as_("puller"), timeout=10
            )
        )
        assert level.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (
            admin.SetLogLevel(
                admin_pb2.SetLogLevelRequest(logger="x.y", level="INFO"), metadata=as_("ops"), timeout=10
            ).level
            == "INFO"
        )
        assert (
            store.DeleteModel(pb.DeleteModelRequest(model_id="test-tiny"), metadata=as_("ops"), timeout=30).state
            == pb.NOT_DOWNLOADED
        )

    registry = served_stores[-1].metrics.registry
    failures = {
        r: registry.get_sample_value("voxserve_auth_failures_total", {"service": "model_service", "reason": r})
        for r in ("missing", "invalid", "forbidden", "malformed")
    }
    assert failures == {"missing": 1, "invalid": 1, "forbidden": 3, "malformed": 0}
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "authentication failed" in logged and "ipv4:127.0.0.1" in logged
    for secret in (*TOKENS.values(), "nope"):
        assert secret not in logged


def test_tokens_file_holds_hashes_not_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({"tokens": {"ci": {"sha256": "my-plain-token", "roles": ["read"]}}}))
    with pytest.raises(TokenFileError, match="sha256 of the token"):
        load_tokens(path)
    path.write_text(yaml.safe_dump({"tokens": {"ci": {"sha256": "a" * 64, "roles": ["root"]}}}))
    with pytest.raises(TokenFileError, match="read, pull, transcribe, admin"):
        load_tokens(path)


def test_watch_streams_per_client_address_are_capped(serve: Callable[..., RunningServer]) -> None:
    running = serve(max_watch_streams_per_peer=3)
    with grpc.insecure_channel(running.address) as channel:
        store = modelstore_pb2_grpc.ModelStoreStub(channel)
        streams = [store.WatchModels(pb.WatchModelsRequest(), timeout=60) for _ in range(3)]
        for stream in streams:
            assert next(stream).type == pb.SNAPSHOT  # each is open and served
        extra = store.WatchModels(pb.WatchModelsRequest(), timeout=60)
        error = refused(lambda: next(extra))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "3 watch streams" in error.details()
        streams[0].cancel()
        wait_for(lambda: _opens(store), timeout=30, message="a slot is free after a stream closed")
        for stream in streams[1:]:
            stream.cancel()


def _opens(store: modelstore_pb2_grpc.ModelStoreStub) -> bool:
    stream = store.WatchModels(pb.WatchModelsRequest(), timeout=60)
    try:
        return next(stream).type == pb.SNAPSHOT
    except grpc.RpcError:
        return False
    finally:
        stream.cancel()


def test_healthcheck_module_speaks_tls(serve: Callable[..., RunningServer], pki: Pki) -> None:
    from voxserve_common.healthcheck import main as healthcheck

    running = serve(tls=pki.server_files())
    assert healthcheck([running.address, "--tls-ca", str(pki.ca_file)]) == 0
    assert healthcheck([running.address, "voxserve.modelstore.v1.ModelStore", "--tls-ca", str(pki.ca_file)]) == 0
    assert healthcheck([running.address]) == 1  # plaintext against a TLS server
    assert healthcheck([running.address, "--tls-ca", str(pki.directory / "missing.pem")]) == 2
