"""The gateway's channels reconnect within a second of a backend coming back (issue 17): with
gRPC's default reconnect backoff (1 s, x1.6 up to 120 s) the gateway kept answering 503 for
16 s or more after a 30 s store outage although the store was back."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

from tests.http_gateway.conftest import GatewayHandle
from tests.hubserver import HubServer
from tests.netfaults import DroppingPort
from tests.support import StoreProcess, free_port, wait_for

OUTAGE_SECONDS = 20.0
# Bounded backoff: an attempt every 0.25-1 s (±20 % jitter). gRPC's default had gaps of 6.7 and
# 10.2 s by this point of an outage; 4 s leaves room for a loaded machine.
MAX_GAP_SECONDS = 4.0


def test_the_gateway_reconnects_to_a_store_that_comes_back(
    tmp_path: Path, hub: HubServer, start_gateway: Callable[..., GatewayHandle]
) -> None:
    port = free_port()
    data_dir = tmp_path / "store"
    store = StoreProcess(tmp_path, data_dir, hub, env={"VOXSERVE_IMPORT_EMBEDDED": "true"}, port=port)
    try:
        store.wait_serving(timeout=60)
        gateway = start_gateway(model_store=f"127.0.0.1:{port}")
        with gateway.http() as http:
            assert http.get("/v1/models").status_code == 200
            store.process.terminate()
            store.process.wait(60)
            store.close()
            down = DroppingPort(port)
            try:
                began = time.monotonic()
                statuses = set()
                while time.monotonic() - began < OUTAGE_SECONDS:  # callers keep asking meanwhile
                    statuses.add(http.get("/v1/models").status_code)
                    time.sleep(0.2)
                attempts = [at for at in down.attempts if at > began + OUTAGE_SECONDS / 2]
            finally:
                down.close()
            assert statuses == {503}, statuses
            assert len(attempts) >= 2, down.attempts
            gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
            assert max(gaps) < MAX_GAP_SECONDS, f"reconnect attempts {gaps} s apart in the outage's second half"

            store = StoreProcess(tmp_path, data_dir, hub, port=port, name="store-again")
            store.wait_serving(timeout=60)
            wait_for(lambda: http.get("/v1/models").status_code == 200, timeout=60, message="the store listed again")
    finally:
        store.close()
