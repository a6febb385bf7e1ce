"""Readiness apart from liveness: the service names are NOT_SERVING until the start-up work
is done and while draining; the overall "" status stays SERVING while the process lives."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import InferenceProcess, free_port, wait_for
from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve_common.server import start_server

SERVICE = "voxserve.test.v1.Thing"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def statuses(address: str) -> tuple[int, int]:
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        named = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status
    return overall, named


def test_liveness_stays_up_while_readiness_follows_start_up_and_draining() -> None:
    seen: dict[str, tuple[int, int]] = {}

    async def scenario() -> None:
        running = await start_server(
            register=lambda server: None,
            service_names=[SERVICE],
            host="127.0.0.1",
            port=0,
            rpc_metrics=None,
            ready=False,
        )
        seen["starting"] = await asyncio.to_thread(statuses, running.address)
        await running.set_ready(True)
        seen["ready"] = await asyncio.to_thread(statuses, running.address)

        async def while_draining() -> None:
            seen["draining"] = await asyncio.to_thread(statuses, running.address)

        running.on_stop.append(while_draining)
        await running.stop(1)

    asyncio.run(scenario())
    assert seen == {"starting": (SERVING, NOT_SERVING), "ready": (SERVING, SERVING), "draining": (SERVING, NOT_SERVING)}


INFERENCE = "voxserve.inference.v1.Inference"


def test_inference_is_not_ready_until_it_has_reached_the_store(tmp_path, start_store) -> None:  # type: ignore[no-untyped-def]
    """A real inference process started before its store: alive ("" SERVING) but not ready;
    once the store runs on its address, the start-up check reaches it and the name is SERVING."""
    store_port = free_port()
    inference = InferenceProcess(tmp_path, f"127.0.0.1:{store_port}")
    try:
        inference.wait_status(SERVING, "")
        wait_for(
            lambda: any(r["message"] == "model store not reached yet; not ready" for r in inference.records()),
            timeout=120,
            message="a failed round of the start-up check",
        )
        assert inference.status(INFERENCE) == NOT_SERVING
        assert inference.status("") == SERVING

        start_store(port=store_port, import_embedded=True)
        inference.wait_status(SERVING, INFERENCE, timeout=120)
        assert inference.status("") == SERVING
        messages = [r["message"] for r in inference.records()]
        assert messages.index("model store reached") < messages.index("inference service ready for requests")
    finally:
        inference.close()


def test_inference_readiness_waits_for_the_preload_too(tmp_path, start_store) -> None:  # type: ignore[no-untyped-def]
    """Ready only after the preload: the model it preloads is loaded when the name turns SERVING."""
    store = start_store(import_embedded=True)
    inference = InferenceProcess(tmp_path, store.address, env={"VOXSERVE_PRELOAD": "silero-vad"})
    try:
        inference.wait_status(SERVING, INFERENCE, timeout=180)
        loaded = inference.stub.ListLoadedModels(ipb.ListLoadedModelsRequest(), timeout=30)
        assert [m.model_id for m in loaded.models] == ["silero-vad"]
        messages = [r["message"] for r in inference.records()]
        assert messages.index("model loaded") < messages.index("inference service ready for requests")
    finally:
        inference.close()
