"""voxctl against a real model store on loopback (and the loopback hub behind it)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import pytest

from tests.support import TINY_EN_DIR, TINY_EN_FILES, StoreHandle, free_port, wait_for
from voxctl.__main__ import main
from voxserve.modelstore.v1 import modelstore_pb2 as pb

VOXCTL = Path(sys.executable).parent / "voxctl"


def run(capsys: pytest.CaptureFixture[str], store: StoreHandle, *argv: str) -> tuple[int, str, str]:
    """voxctl in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["--store", store.address, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def ls_states(capsys: pytest.CaptureFixture[str], store: StoreHandle) -> dict[str, str]:
    code, out, _ = run(capsys, store, "--json", "models", "ls")
    assert code == 0
    return {m["model_id"]: m["state"] for m in json.loads(out)["models"]}


def table_row(out: str, model_id: str) -> list[str]:
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:4] == ["MODEL", "KIND", "STATE", "SIZE"]
    return next(row for row in rows if row[0] == model_id)


def test_ls_shows_the_catalog_not_downloaded(capsys, store: StoreHandle) -> None:
    code, out, err = run(capsys, store, "models", "ls")
    assert code == 0, err
    row = table_row(out, "test-text")
    assert row[1:3] == ["whisper", "NOT_DOWNLOADED"]
    assert row[-1] == "test-org/text-files"
    assert table_row(out, "test-tiny")[2] == "NOT_DOWNLOADED"


def test_ls_kind_filter(capsys, store: StoreHandle) -> None:
    code, out, _ = run(capsys, store, "--json", "models", "ls", "--kind", "demucs")
    assert code == 0
    demucs = json.loads(out)["models"]
    assert demucs and {m["kind"] for m in demucs} == {"DEMUCS"}
    code, out, _ = run(capsys, store, "models", "ls", "--kind", "whisper", "--json")  # --json after the command
    whisper = json.loads(out)["models"]
    assert {m["kind"] for m in whisper} == {"WHISPER"}
    assert {"test-text", "test-tiny"} <= {m["model_id"] for m in whisper}


def test_pull_verify_rm_round_trip(capsys, store: StoreHandle, hub) -> None:
    code, out, err = run(capsys, store, "models", "pull", "test-text")
    assert code == 0, err
    # stderr is not a TTY under capsys: plain lines, one per state change at least.
    assert "\r" not in err
    assert "test-text WAITING" in err
    assert "test-text DOWNLOADING" in err and "MiB" in err
    assert "test-text READY 2.0 MiB" in err
    assert out.startswith("test-text: READY, 2.0 MiB, revision ") and hub.endpoint in out

    code, out, _ = run(capsys, store, "models", "ls")
    assert table_row(out, "test-text")[2:5] == ["READY", "2.0", "MiB"]

    code, out, err = run(capsys, store, "models", "verify", "test-text")
    assert code == 0, err
    assert {"ok      config.json", "ok      weights.bin", "ok      sub/notes.txt"} <= set(out.splitlines())
    assert "test-text: ok; 3 files checked" in out

    code, out, err = run(capsys, store, "models", "get", "test-text")
    assert code == 0, err
    weights = store.stub.GetModel(pb.GetModelRequest(model_id="test-text"))
    sha = next(f.sha256 for f in weights.files if f.path == "weights.bin")
    assert any(
        line.split()[0] == "weights.bin" and sha in line and line.split()[-1] == "yes" for line in out.splitlines()
    )

    code, out, err = run(capsys, store, "models", "rm", "test-text")
    assert code == 0, err
    assert "test-text: removed (now NOT_DOWNLOADED)" in out
    assert ls_states(capsys, store)["test-text"] == "NOT_DOWNLOADED"


def test_verify_reports_a_damaged_file_and_exits_1(capsys, store: StoreHandle) -> None:
    assert run(capsys, store, "models", "pull", "test-text")[0] == 0
    local = Path(store.stub.GetModel(pb.GetModelRequest(model_id="test-text")).local_path)
    weights = local / "weights.bin"
    weights.write_bytes(bytes(reversed(weights.read_bytes())))
    code, out, _ = run(capsys, store, "models", "verify", "test-text")
    assert code == 1
    assert "FAILED  weights.bin: sha256 mismatch" in out
    assert "ok      config.json" in out


def test_pull_of_unknown_id_prints_the_status_and_exits_1(capsys, store: StoreHandle) -> None:
    code, out, err = run(capsys, store, "models", "pull", "no-such-model")
    assert code == 1
    assert out == ""
    assert err.startswith("error: NOT_FOUND: unknown model_id 'no-such-model'")
    assert "ListModels shows the catalog" in err


def test_ready_model_pull_is_one_event(capsys, store: StoreHandle, hub) -> None:
    assert run(capsys, store, "models", "pull", "test-text")[0] == 0
    hub.reset_stats()
    code, out, err = run(capsys, store, "--json", "models", "pull", "test-text")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 1 and events[0]["state"] == "READY" and events[0]["type"] == "STATE_CHANGED"
    assert hub.requests == []


def test_import_from_a_directory(capsys, store: StoreHandle, hub) -> None:
    code, out, err = run(capsys, store, "models", "import", "test-tiny", str(TINY_EN_DIR))
    assert code == 0, err
    assert out.startswith("test-tiny: READY") and f"import:{TINY_EN_DIR}" not in err
    model = store.stub.GetModel(pb.GetModelRequest(model_id="test-tiny"))
    assert model.state == pb.READY and model.source == f"import:{TINY_EN_DIR}"
    assert {f.path for f in model.files if f.present} >= set(TINY_EN_FILES) - {"vocabulary.txt"}
    assert hub.requests == []


def test_import_makes_a_relative_dir_absolute(capsys, store: StoreHandle, monkeypatch) -> None:
    monkeypatch.chdir(TINY_EN_DIR.parent)
    code, _, err = run(capsys, store, "models", "import", "test-tiny", TINY_EN_DIR.name)
    assert code == 0, err
    assert store.stub.GetModel(pb.GetModelRequest(model_id="test-tiny")).source == f"import:{TINY_EN_DIR}"


def test_import_embedded_without_a_copy_is_invalid_argument(capsys, store: StoreHandle) -> None:
    code, _, err = run(capsys, store, "models", "import", "test-text", "--embedded")
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT: test-text has no embedded copy")


def test_json_ls_parses(capsys, store: StoreHandle) -> None:
    code, out, _ = run(capsys, store, "--json", "models", "ls")
    assert code == 0
    models = {m["model_id"]: m for m in json.loads(out)["models"]}
    assert {"test-tiny", "test-text"} <= set(models)
    assert models["test-text"]["repo_id"] == "test-org/text-files"
    assert models["test-text"]["state"] == "NOT_DOWNLOADED"


def test_store_down_is_unavailable(capsys) -> None:
    code = main(["--store", f"127.0.0.1:{free_port()}", "--timeout", "5", "models", "ls"])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("error: UNAVAILABLE: ")


def _env(store: StoreHandle) -> dict[str, str]:
    return {**os.environ, "VOXCTL_STORE": store.address, "PYTHONUNBUFFERED": "1"}


def test_console_script_lists_models(store: StoreHandle) -> None:
    assert VOXCTL.exists(), VOXCTL
    result = subprocess.run([str(VOXCTL), "models", "ls"], env=_env(store), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert table_row(result.stdout, "test-text")[2] == "NOT_DOWNLOADED"
    assert table_row(result.stdout, "test-tiny")[2] == "NOT_DOWNLOADED"


class LineReader:
    """Collects a subprocess's output lines in a thread so the test can wait for one."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert stream is not None
        threading.Thread(target=lambda: [self.lines.put(line) for line in stream], daemon=True).start()

    def wait_for(self, fragment: str, timeout: float = 30) -> str:
        def found() -> str | None:
            while not self.lines.empty():
                self.seen.append(self.lines.get())
            return next((line for line in self.seen if fragment in line), None)

        return str(wait_for(found, timeout=timeout, message=f"{fragment!r} in voxctl output"))


def test_watch_follows_a_pull_and_reconnects_after_a_store_restart(start_store, store_config) -> None:
    port = free_port()
    first = start_store(port=port)
    proc = subprocess.Popen(
        [str(VOXCTL), "models", "watch", "--model", "test-text"],
        env=_env(first),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        reader = LineReader(proc.stdout)
        reader.wait_for("SNAPSHOT_END")
        snapshot = reader.wait_for("SNAPSHOT ")
        assert "test-text" in snapshot and "NOT_DOWNLOADED" in snapshot
        assert list(first.stub.PullModel(pb.PullModelRequest(model_id="test-text")))[-1].state == pb.READY
        ready = reader.wait_for("READY")
        assert ready.split()[1] == "STATE_CHANGED" and ready.split()[2] == "test-text"
        assert any(line.split()[1] == "PROGRESS" for line in reader.seen)
        sequences = [int(line.split()[0]) for line in reader.seen if line.split()[1] in ("STATE_CHANGED", "PROGRESS")]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)

        # A new store incarnation on the same port and data: voxctl resumes after the last
        # sequence it saw, which the new server does not know, so it resyncs with a snapshot.
        first.stop()
        second = start_store(port=port)
        resync = reader.wait_for("(resync)")
        assert "test-text" in resync and "READY" in resync
        reader.wait_for("resync complete")
        assert second.address == first.address
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert proc.returncode == 130, err
    assert "watch: UNAVAILABLE: " in err and "reconnecting in 0.5 s after sequence " in err


def test_ctrl_c_stops_following_a_pull_which_cancel_then_stops(capsys, store: StoreHandle, hub) -> None:
    hub.throttle(256 * 1024, path="weights.bin")  # 2 MiB: about 8 s
    proc = subprocess.Popen(
        [str(VOXCTL), "models", "pull", "test-text"],
        env=_env(store),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        reader = LineReader(proc.stderr)
        progress = reader.wait_for("/2.0 MiB")
        assert progress.startswith("test-text DOWNLOADING [") and "weights.bin" in progress
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.wait_for("interrupted; the download of test-text continues on the store")
    assert proc.stdout is not None and proc.stdout.read() == ""
    assert ls_states(capsys, store)["test-text"] == "DOWNLOADING"

    code, out, err = run(capsys, store, "models", "cancel", "test-text")
    assert code == 0, err
    # Files finished before the cancel stay (INCOMPLETE); the interrupted one is gone.
    state = ls_states(capsys, store)["test-text"]
    assert state in ("INCOMPLETE", "NOT_DOWNLOADED")
    assert out == f"test-text: download cancelled (now {state})\n"
    model = store.stub.GetModel(pb.GetModelRequest(model_id="test-text"))
    assert not next(f for f in model.files if f.path == "weights.bin").present
    hub.throttle(None)


def test_pull_shows_verification_progress_of_kept_files(capsys, start_store) -> None:
    store = start_store(download_chunk_bytes=64 << 10, progress_events_per_second=10_000)
    assert run(capsys, store, "models", "pull", "test-text")[0] == 0
    model_dir = Path(store.stub.GetModel(pb.GetModelRequest(model_id="test-text")).local_path)
    (model_dir / "config.json").unlink()
    assert run(capsys, store, "models", "verify", "test-text")[0] == 1  # INCOMPLETE: kept files get re-hashed

    code, _, err = run(capsys, store, "models", "pull", "test-text")
    assert code == 0, err
    verifying = [line for line in err.splitlines() if line.startswith("test-text VERIFYING [")]
    assert verifying and all(" verifying " in line and " %" in line for line in verifying), err
    assert "test-text READY 2.0 MiB" in err


def test_verification_progress_lines() -> None:
    from voxctl.models import pull_status, watch_line

    event = pb.ModelEvent(
        sequence=7,
        model_id="m",
        type=pb.PROGRESS,
        state=pb.VERIFYING,
        bytes_done=10 << 20,
        bytes_total=10 << 20,
        verify_bytes_done=4 << 20,
        verify_bytes_total=10 << 20,
        current_file="model.bin",
    )
    assert pull_status(event) == "m VERIFYING [##########..............] verifying 40 %  4.0 MiB/10.0 MiB  model.bin"
    assert watch_line(event).endswith("VERIFYING      verifying 40 %  4.0 MiB/10.0 MiB model.bin")
    nothing_to_rehash = pb.ModelEvent(
        model_id="m", type=pb.STATE_CHANGED, state=pb.VERIFYING, files_done=2, files_total=2
    )
    assert pull_status(nothing_to_rehash) == "m VERIFYING 2/2 files"
