"""The loopback hub server answers the real huggingface_hub client like the hub, and injects faults."""

from __future__ import annotations

import os

# huggingface_hub reads these at import time.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)

import hashlib
import ipaddress
import pathlib
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import get_session

from tests.hubserver import LFS_THRESHOLD, HubServer, refused_endpoint

REPO_ID = "voxserve/tiny-model"


@dataclass(frozen=True)
class Repo:
    repo_id: str
    files: dict[str, bytes]
    commit: str


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Record every outgoing connection so a test fails if the client talks to any other host."""
    assert not huggingface_hub.constants.is_offline_mode(), "unset HF_HUB_OFFLINE to run these tests"
    addresses: list[Any] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        addresses.append(address)
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield addresses
    foreign = [a for a in addresses if isinstance(a, tuple) and not ipaddress.ip_address(a[0]).is_loopback]
    assert foreign == [], f"huggingface_hub connected outside loopback: {foreign}"


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture
def repo(hub: HubServer, tmp_path: pathlib.Path) -> Repo:
    """A small text file, a file in a subdirectory and a >1 MiB LFS binary served from disk."""
    weights = random.Random(0).randbytes(LFS_THRESHOLD + 123_457)
    weights_path = tmp_path / "model.bin"
    weights_path.write_bytes(weights)
    files = {
        "config.json": b'{"sample_rate": 16000}\n',
        "tokenizer/vocab.txt": b"<s>\n</s>\nhello\n",
        "model.bin": weights,
    }
    commit = hub.add_repo(REPO_ID, {**files, "model.bin": weights_path})
    return Repo(REPO_ID, files, commit)


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def test_snapshot_download_fetches_every_file_at_the_commit(
    hub: HubServer, repo: Repo, tmp_path: pathlib.Path, loopback_only: list[Any]
) -> None:
    snapshot = pathlib.Path(snapshot_download(repo.repo_id, endpoint=hub.endpoint, cache_dir=tmp_path / "cache"))

    assert snapshot.name == repo.commit
    for name, data in repo.files.items():
        assert (snapshot / name).read_bytes() == data
    assert hub.bytes_served(repo.repo_id) == sum(len(d) for d in repo.files.values())
    requested = {(r.method, r.path.split("?")[0]) for r in hub.requests}
    assert ("GET", f"/api/models/{REPO_ID}/revision/main") in requested
    assert ("GET", f"/api/models/{REPO_ID}/tree/{repo.commit}") in requested
    for name in repo.files:
        assert ("HEAD", f"/{REPO_ID}/resolve/{repo.commit}/{name}") in requested
        assert ("GET", f"/{REPO_ID}/resolve/{repo.commit}/{name}") in requested
    assert not any("xet" in r.path for r in hub.requests)
    assert ("127.0.0.1", hub.port) in loopback_only  # the connection guard does see the client


def test_model_info_tree_and_paths_info_advertise_content_hashes(hub: HubServer, repo: Repo) -> None:
    api = HfApi(endpoint=hub.endpoint)
    weights = repo.files["model.bin"]

    info = api.model_info(repo.repo_id, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert info.sha == repo.commit
    assert {name: s.size for name, s in siblings.items()} == {n: len(d) for n, d in repo.files.items()}
    assert siblings["model.bin"].lfs is not None
    assert siblings["model.bin"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].blob_id == git_sha1(repo.files["config.json"])

    tree = {f.path: f for f in api.list_repo_tree(repo.repo_id, recursive=True) if isinstance(f, RepoFile)}
    assert {p: f.blob_id for p, f in tree.items()} == {n: s.blob_id for n, s in siblings.items()}
    assert tree["model.bin"].lfs is not None and tree["model.bin"].lfs.sha256 == siblings["model.bin"].lfs.sha256

    [paths_info] = api.get_paths_info(repo.repo_id, ["model.bin"], revision=repo.commit)
    assert isinstance(paths_info, RepoFile) and paths_info.lfs is not None
    assert paths_info.lfs.sha256 == hashlib.sha256(weights).hexdigest()
    subdir = [f.path for f in api.list_repo_tree(repo.repo_id, path_in_repo="tokenizer")]
    assert subdir == ["tokenizer/vocab.txt"]


def test_head_reports_sha256_etag_for_lfs_and_git_sha1_otherwise(hub: HubServer) -> None:
    small_weights = b"\x00\x01" * 100
    files = {"w.safetensors": small_weights, "README.md": b"# hi\n"}
    commit = hub.add_repo("voxserve/lfs", files, lfs={"w.safetensors"})

    lfs_meta = huggingface_hub.get_hf_file_metadata(hub.file_url("voxserve/lfs", "w.safetensors"))
    plain_meta = huggingface_hub.get_hf_file_metadata(hub.file_url("voxserve/lfs", "README.md"))

    assert (lfs_meta.etag, lfs_meta.size, lfs_meta.commit_hash) == (
        hashlib.sha256(small_weights).hexdigest(),
        len(small_weights),
        commit,
    )
    assert plain_meta.etag == git_sha1(b"# hi\n")


def test_commit_changes_with_content_and_old_commits_stay_reachable(hub: HubServer) -> None:
    api = HfApi(endpoint=hub.endpoint)
    first = hub.add_repo("voxserve/moving", {"a.txt": b"one"})
    assert hub.add_repo("voxserve/moving", {"a.txt": b"one"}) == first

    second = hub.add_repo("voxserve/moving", {"a.txt": b"two"})

    assert second != first
    assert api.model_info("voxserve/moving").sha == second
    assert api.model_info("voxserve/moving", revision=first).sha == first


def test_range_requests_return_the_requested_slice(hub: HubServer, repo: Repo) -> None:
    weights = repo.files["model.bin"]
    url = hub.file_url(repo.repo_id, "model.bin")

    middle = get_session().get(url, headers={"Range": "bytes=100-199"})
    tail = get_session().get(url, headers={"Range": f"bytes={len(weights) - 10}-"})
    beyond = get_session().get(url, headers={"Range": f"bytes={len(weights)}-"})

    assert (middle.status_code, middle.content) == (206, weights[100:200])
    assert middle.headers["Content-Range"] == f"bytes 100-199/{len(weights)}"
    assert (tail.status_code, tail.content) == (206, weights[-10:])
    assert beyond.status_code == 416
    assert hub.requests[-1].headers["Range"] == f"bytes={len(weights)}-"


def test_unknown_repo_revision_and_file_raise_the_hub_errors(
    hub: HubServer, repo: Repo, tmp_path: pathlib.Path
) -> None:
    api = HfApi(endpoint=hub.endpoint)

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("voxserve/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo.repo_id, revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo.repo_id, "missing.txt", endpoint=hub.endpoint, cache_dir=tmp_path)


def test_fail_with_answers_requests_with_the_status_until_cleared(hub: HubServer, repo: Repo) -> None:
    api = HfApi(endpoint=hub.endpoint)

    hub.fail_with(503)
    with pytest.raises(HfHubHTTPError) as failure:
        api.model_info(repo.repo_id)
    assert failure.value.response.status_code == 503

    hub.fail_with(500, path="*.bin")
    assert get_session().get(hub.file_url(repo.repo_id, "model.bin")).status_code == 500
    assert get_session().get(hub.file_url(repo.repo_id, "config.json")).status_code == 200

    hub.fail_with(None)
    assert api.model_info(repo.repo_id).sha == repo.commit


def test_drop_after_closes_the_connection_mid_body(hub: HubServer, repo: Repo) -> None:
    url = hub.file_url(repo.repo_id, "model.bin")
    size = len(repo.files["model.bin"])
    received = bytearray()

    hub.drop_after(70_000, path="model.bin")
    with pytest.raises(httpx2.RemoteProtocolError), get_session().stream("GET", url) as response:
        assert int(response.headers["Content-Length"]) == size
        for chunk in response.iter_raw():
            received += chunk

    assert bytes(received) == repo.files["model.bin"][:70_000]
    assert hub.bytes_served(path="model.bin") == 70_000
    assert get_session().get(url).content == repo.files["model.bin"]  # only the next GET was dropped


def test_hf_hub_download_restarts_a_dropped_small_file_from_zero(
    hub: HubServer, repo: Repo, tmp_path: pathlib.Path
) -> None:
    """huggingface_hub resumes only in 10 MiB chunks: below that, a dropped file is fetched again."""
    weights = repo.files["model.bin"]
    hub.drop_after(300_000, path="model.bin")

    path = hf_hub_download(repo.repo_id, "model.bin", endpoint=hub.endpoint, cache_dir=tmp_path)

    assert pathlib.Path(path).read_bytes() == weights
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.bin")]
    assert [r.headers.get("Range") for r in gets] == [None, None]
    assert hub.bytes_served(path="model.bin") == len(weights) + 300_000


def test_corrupted_bytes_pass_the_client_while_metadata_keeps_the_sha256(
    hub: HubServer, repo: Repo, tmp_path: pathlib.Path
) -> None:
    weights = repo.files["model.bin"]
    corrupted = bytes(b ^ 0xFF for b in weights[:16]) + weights[16:]
    with pytest.raises(ValueError):
        hub.corrupt_file(repo.repo_id, "model.bin", corrupted[:-1])

    hub.corrupt_file(repo.repo_id, "model.bin", corrupted)
    path = hf_hub_download(repo.repo_id, "model.bin", endpoint=hub.endpoint, cache_dir=tmp_path)
    info = HfApi(endpoint=hub.endpoint).model_info(repo.repo_id, files_metadata=True)

    assert pathlib.Path(path).read_bytes() == corrupted
    [sibling] = [s for s in info.siblings or [] if s.rfilename == "model.bin"]
    assert sibling.lfs is not None and sibling.lfs.sha256 == hashlib.sha256(weights).hexdigest()


def test_throttle_paces_the_body_so_a_reader_can_stop_mid_file(hub: HubServer, repo: Repo) -> None:
    size = len(repo.files["model.bin"])
    hub.throttle(200_000, path="model.bin")

    with get_session().stream("GET", hub.file_url(repo.repo_id, "model.bin")) as response:
        read = 0
        for chunk in response.iter_raw(16_384):
            read += len(chunk)
            if read >= 40_000:
                break

    assert 40_000 <= hub.bytes_served(path="model.bin") < size // 2


def test_stop_refuses_requests_on_kept_alive_connections_and_restarts_on_the_same_port(
    hub: HubServer, repo: Repo
) -> None:
    api = HfApi(endpoint=hub.endpoint)
    endpoint = hub.endpoint
    assert api.model_info(repo.repo_id).sha == repo.commit  # leaves a kept-alive connection in the pool

    hub.stop()
    with pytest.raises(httpx2.ConnectError):
        api.model_info(repo.repo_id)

    hub.start()
    assert hub.endpoint == endpoint
    assert api.model_info(repo.repo_id).sha == repo.commit


def test_stop_cuts_a_download_in_progress(hub: HubServer, repo: Repo) -> None:
    hub.throttle(100_000)

    with (
        pytest.raises(httpx2.HTTPError),
        get_session().stream("GET", hub.file_url(repo.repo_id, "model.bin")) as response,
    ):
        for read, _ in enumerate(response.iter_raw(8_192)):
            if read == 2:
                hub.stop()

    assert hub.bytes_served() < len(repo.files["model.bin"])


def test_refused_endpoint_makes_downloads_fail_as_unreachable(tmp_path: pathlib.Path) -> None:
    endpoint = refused_endpoint()

    with pytest.raises(httpx2.ConnectError):
        HfApi(endpoint=endpoint).model_info(REPO_ID)
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(REPO_ID, endpoint=endpoint, cache_dir=tmp_path)


def test_hang_delays_answers_past_the_client_timeout(hub: HubServer, repo: Repo) -> None:
    url = hub.file_url(repo.repo_id, "config.json")

    hub.hang(1.0)
    with pytest.raises(httpx2.TimeoutException):
        get_session().get(url, timeout=0.2)

    hub.hang(None)
    assert get_session().get(url, timeout=5).content == repo.files["config.json"]
