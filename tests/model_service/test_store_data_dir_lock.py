"""One store per data dir: a second one exits 2 naming the directory and the holder."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tests.hubserver import HubServer
from tests.support import StoreProcess, pull
from voxserve.modelstore.v1 import modelstore_pb2 as pb


def test_second_store_on_a_data_dir_exits_2_naming_the_holder_and_a_crash_frees_it(
    tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    data_dir = tmp_path / "data"
    first = StoreProcess(tmp_path, data_dir, hub, name="first")
    store_processes.append(first)
    first.wait_serving()

    second = StoreProcess(tmp_path, data_dir, hub, name="second")
    store_processes.append(second)
    assert second.process.wait(60) == 2, second.stderr()
    message = second.stderr()
    assert str(data_dir.resolve()) in message, message
    assert f"pid {first.process.pid} on {socket.gethostname()}" in message, message
    assert "--data-dir" in message  # what to do about it
    # The first store is untouched and still works.
    assert pull(first, "test-tiny")[-1].state == pb.READY
    assert (data_dir / "store.lock").read_text().split()[0] == str(first.process.pid)

    first.kill()  # SIGKILL: nothing releases the lock but the kernel
    third = StoreProcess(tmp_path, data_dir, hub, name="third")
    store_processes.append(third)
    third.wait_serving()
    assert third.stub.GetModel(pb.GetModelRequest(model_id="test-tiny")).state == pb.READY
    assert (data_dir / "store.lock").read_text().split()[0] == str(third.process.pid)
    assert third.process.pid != os.getpid()
