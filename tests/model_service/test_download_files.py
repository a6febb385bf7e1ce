"""FileDownloader and PartialFile against the loopback hub with the real huggingface_hub client:
Range resumes, retries after drops, endpoint fallback, size and hash checks, cancellation.
Also the DownloadQueue's joining and ordering."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from model_service.catalog import CatalogEntry
from model_service.errors import DownloadCancelled, IntegrityError, SourcesFailed
from model_service.store.download.files import DownloadedFile, FileDownloader, PartialFile
from model_service.store.download.hub import HubClient, RemoteFile, RemoteManifest
from model_service.store.download.queue import DownloadJob, DownloadQueue
from model_service.store.download.retry import Retrier
from model_service.store.download.sources import SourceBreakers
from tests.hubserver import HubServer, refused_endpoint

REPO = "unit-org/downloader"
WEIGHTS = hashlib.sha256(b"seed").digest() * 65536  # 2 MiB, LFS: checked by sha256
SMALL = b'{"small": "git file, checked by its blob sha1"}\n'
ENTRY = CatalogEntry("unit", "whisper", REPO, "main", (), ("config.json",))


class Calls:
    """What the downloader reported through its callbacks."""

    def __init__(self) -> None:
        self.bytes = 0
        self.by_endpoint: dict[str, int] = {}
        self.source_failures: list[tuple[str, str]] = []
        self.verify_failures: list[str] = []

    def on_bytes(self, count: int, endpoint: str) -> None:
        self.bytes += count
        self.by_endpoint[endpoint] = self.by_endpoint.get(endpoint, 0) + count

    def on_source_failed(self, endpoint: str, reason: str) -> None:
        self.source_failures.append((endpoint, reason))

    def on_verify_failed(self, reason: str) -> None:
        self.verify_failures.append(reason)


@pytest.fixture
def repo_hub(hub: HubServer) -> HubServer:
    hub.add_repo(REPO, {"weights.bin": WEIGHTS, "config.json": SMALL})
    return hub


def manifest_of(hub: HubServer) -> RemoteManifest:
    return HubClient((hub.endpoint,), timeout=5).manifest(hub.endpoint, ENTRY, "main")


def remote(hub: HubServer, path: str) -> RemoteFile:
    return next(f for f in manifest_of(hub).files if f.path == path)


def download(
    downloader: FileDownloader,
    hub: HubServer,
    remote_file: RemoteFile,
    partial: PartialFile,
    calls: Calls,
    endpoints: tuple[str, ...] | None = None,
    cancel: threading.Event | None = None,
) -> DownloadedFile:
    return downloader.download(
        repo_id=REPO,
        commit=hub.commit(REPO),
        remote=remote_file,
        partial=partial,
        endpoints=endpoints or (hub.endpoint,),
        cancel=cancel or threading.Event(),
        on_bytes=calls.on_bytes,
        on_source_failed=calls.on_source_failed,
        on_verify_failed=calls.on_verify_failed,
    )


def make_downloader(hub: HubServer, *extra: str, retries: int = 3) -> FileDownloader:
    client = HubClient((hub.endpoint, *extra), timeout=5)
    return FileDownloader(client, Retrier(SourceBreakers(client.sources), retries, backoff=0))


def ranges(hub: HubServer, path: str) -> list[str | None]:
    return [r.headers.get("Range") for r in hub.requests if r.method == "GET" and r.path.endswith("/" + path)]


def test_fetch_writes_the_file_and_checks_its_sha256(repo_hub: HubServer, tmp_path: Path) -> None:
    weights = remote(repo_hub, "weights.bin")
    partial = PartialFile.for_target(tmp_path, Path("weights.bin"))
    calls = Calls()
    repo_hub.reset_stats()

    result = download(make_downloader(repo_hub), repo_hub, weights, partial, calls)

    assert result.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert (result.source, result.bytes_fetched, result.resumed_from) == (repo_hub.endpoint, len(WEIGHTS), 0)
    assert partial.part.read_bytes() == WEIGHTS
    assert json.loads(partial.sidecar.read_text()) == partial.describe(REPO, repo_hub.commit(REPO), weights)
    assert calls.bytes == len(WEIGHTS) and not calls.source_failures
    assert ranges(repo_hub, "weights.bin") == [None]


def test_a_git_file_is_checked_by_its_blob_sha1(repo_hub: HubServer, tmp_path: Path) -> None:
    config = remote(repo_hub, "config.json")
    assert config.sha256 == "" and config.git_oid
    partial = PartialFile.for_target(tmp_path, Path("config.json"))

    result = download(make_downloader(repo_hub), repo_hub, config, partial, Calls())

    assert partial.part.read_bytes() == SMALL
    assert result.sha256 == hashlib.sha256(SMALL).hexdigest()


def test_partial_bytes_of_the_same_file_are_resumed_with_range(repo_hub: HubServer, tmp_path: Path) -> None:
    weights = remote(repo_hub, "weights.bin")
    partial = PartialFile.for_target(tmp_path / "sub", Path("weights.bin"))
    identity = partial.describe(REPO, repo_hub.commit(REPO), weights)
    partial.start(identity)
    partial.part.write_bytes(WEIGHTS[:700_000])  # as a crash leaves it
    repo_hub.reset_stats()
    calls = Calls()

    result = download(make_downloader(repo_hub), repo_hub, weights, partial, calls)

    assert result.resumed_from == 700_000 and result.bytes_fetched == len(WEIGHTS) - 700_000
    assert ranges(repo_hub, "weights.bin") == ["bytes=700000-"]
    assert repo_hub.bytes_served(REPO, "weights.bin") == len(WEIGHTS) - 700_000
    assert partial.part.read_bytes() == WEIGHTS
    assert calls.bytes == len(WEIGHTS) - 700_000


def test_partial_bytes_of_another_version_are_discarded(repo_hub: HubServer, tmp_path: Path) -> None:
    weights = remote(repo_hub, "weights.bin")
    partial = PartialFile.for_target(tmp_path, Path("weights.bin"))
    stale = partial.describe(REPO, "0" * 40, weights)  # written for another commit
    partial.start(stale)
    partial.part.write_bytes(b"\xff" * 500_000)
    current = partial.describe(REPO, repo_hub.commit(REPO), weights)

    assert partial.resumable_bytes(current) == 0
    assert not partial.part.exists() and not partial.sidecar.exists()

    partial.start(stale)
    partial.part.write_bytes(b"\xff" * 500_000)
    repo_hub.reset_stats()
    result = download(make_downloader(repo_hub), repo_hub, weights, partial, Calls())
    assert result.resumed_from == 0 and ranges(repo_hub, "weights.bin") == [None]
    assert partial.part.read_bytes() == WEIGHTS


def test_partial_larger_than_the_file_or_without_sidecar_is_not_resumable(tmp_path: Path) -> None:
    file = RemoteFile("a.bin", 10, "", "")
    partial = PartialFile.for_target(tmp_path, Path("a.bin"))
    identity = partial.describe(REPO, "c" * 40, file)
    partial.start(identity)
    partial.part.write_bytes(b"x" * 11)
    assert partial.resumable_bytes(identity) == 0 and not partial.part.exists()

    partial.start(identity)
    partial.part.write_bytes(b"x" * 4)
    partial.sidecar.unlink()
    assert partial.resumable_bytes(identity) == 0 and not partial.part.exists()

    partial.start(identity)
    partial.part.write_bytes(b"x" * 4)
    assert partial.resumable_bytes(identity) == 4


def test_dropped_connections_resume_where_they_broke_off(repo_hub: HubServer, tmp_path: Path) -> None:
    weights = remote(repo_hub, "weights.bin")
    partial = PartialFile.for_target(tmp_path, Path("weights.bin"))
    # Four drops, more than the retry budget, but each one after new bytes: the budget resets.
    repo_hub.drop_after(300_000, times=4, path="weights.bin")
    repo_hub.reset_stats()
    calls = Calls()

    result = download(make_downloader(repo_hub, retries=2), repo_hub, weights, partial, calls)

    assert partial.part.read_bytes() == WEIGHTS
    assert result.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert ranges(repo_hub, "weights.bin") == [
        None,
        "bytes=300000-",
        "bytes=600000-",
        "bytes=900000-",
        "bytes=1200000-",
    ]
    assert repo_hub.bytes_served(REPO, "weights.bin") == len(WEIGHTS)  # nothing sent twice
    assert calls.bytes == len(WEIGHTS) and not calls.source_failures


def test_drops_without_progress_use_up_the_retries(repo_hub: HubServer, tmp_path: Path) -> None:
    weights = remote(repo_hub, "weights.bin")
    partial = PartialFile.for_target(tmp_path, Path("weights.bin"))
    repo_hub.drop_after(0, times=10, path="weights.bin")

    with pytest.raises(SourcesFailed) as failed:
        download(make_downloader(repo_hub, retries=3), repo_hub, weights, partial, calls := Calls())

    assert len(ranges(repo_hub, "weights.bin")) == 3
    assert "weights.bin" in str(failed.value) and repo_hub.endpoint in str(failed.value)
    assert [endpoint for endpoint, _ in calls.source_failures] == [repo_hub.endpoint]


def test_server_errors_are_retried_then_reported(repo_hub: HubServer, tmp_path: Path) -> None:
    weights = remote(repo_hub, "weights.bin")
    repo_hub.fail_with(500, path="weights.bin")
    repo_hub.reset_stats()

    with pytest.raises(SourcesFailed, match="HTTP 500"):
        download(
            make_downloader(repo_hub, retries=3),
            repo_hub,
            weights,
            PartialFile.for_target(tmp_path, Path("w")),
            Calls(),
        )

    assert len(ranges(repo_hub, "weights.bin")) == 3


def test_an_unreachable_endpoint_falls_back_to_the_next(repo_hub: HubServer, tmp_path: Path) -> None:
    weights = remote(repo_hub, "weights.bin")
    refused = refused_endpoint()
    partial = PartialFile.for_target(tmp_path, Path("weights.bin"))
    calls = Calls()

    result = download(
        make_downloader(repo_hub, refused), repo_hub, weights, partial, calls, endpoints=(refused, repo_hub.endpoint)
    )

    assert result.source == repo_hub.endpoint
    assert [endpoint for endpoint, _ in calls.source_failures] == [refused]
    assert calls.source_failures[0][1].startswith("connection failed")
    assert calls.by_endpoint == {repo_hub.endpoint: len(WEIGHTS)}
    assert partial.part.read_bytes() == WEIGHTS


def test_a_not_found_endpoint_is_not_retried(repo_hub: HubServer, tmp_path: Path) -> None:
    ghost = RemoteFile("absent.bin", 10, "", "")
    repo_hub.reset_stats()

    with pytest.raises(SourcesFailed, match="file not found"):
        download(
            make_downloader(repo_hub, retries=5), repo_hub, ghost, PartialFile.for_target(tmp_path, Path("a")), Calls()
        )

    assert len(ranges(repo_hub, "absent.bin")) == 1


def test_wrong_bytes_of_the_right_size_are_an_integrity_error(repo_hub: HubServer, tmp_path: Path) -> None:
    weights = remote(repo_hub, "weights.bin")
    repo_hub.corrupt_file(REPO, "weights.bin", bytes(reversed(WEIGHTS)))
    partial = PartialFile.for_target(tmp_path, Path("weights.bin"))
    calls = Calls()

    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        download(make_downloader(repo_hub), repo_hub, weights, partial, calls)

    assert len(calls.verify_failures) == 1 and "sha256 mismatch for weights.bin" in calls.verify_failures[0]
    assert not partial.part.exists() and not partial.sidecar.exists()  # bad bytes are never resumed


def test_a_corrupt_git_file_fails_its_blob_sha1(repo_hub: HubServer, tmp_path: Path) -> None:
    config = remote(repo_hub, "config.json")
    repo_hub.corrupt_file(REPO, "config.json", SMALL.upper())

    with pytest.raises(IntegrityError, match="git blob sha1 mismatch"):
        download(make_downloader(repo_hub), repo_hub, config, PartialFile.for_target(tmp_path, Path("c")), Calls())


def test_a_body_longer_than_the_manifest_says_is_refused(repo_hub: HubServer, tmp_path: Path) -> None:
    weights = remote(repo_hub, "weights.bin")
    short = RemoteFile(weights.path, weights.size - 1000, weights.sha256, weights.git_oid)

    with pytest.raises(SourcesFailed, match="more than"):
        download(
            make_downloader(repo_hub, retries=1), repo_hub, short, PartialFile.for_target(tmp_path, Path("w")), Calls()
        )


def test_cancel_stops_the_download_and_keeps_what_arrived(repo_hub: HubServer, tmp_path: Path) -> None:
    weights = remote(repo_hub, "weights.bin")
    partial = PartialFile.for_target(tmp_path, Path("weights.bin"))
    cancel = threading.Event()
    calls = Calls()

    def on_bytes(count: int, endpoint: str) -> None:
        calls.on_bytes(count, endpoint)
        if calls.bytes >= 256 << 10:
            cancel.set()

    with pytest.raises(DownloadCancelled):
        make_downloader(repo_hub).download(
            repo_id=REPO,
            commit=repo_hub.commit(REPO),
            remote=weights,
            partial=partial,
            endpoints=(repo_hub.endpoint,),
            cancel=cancel,
            on_bytes=on_bytes,
        )

    assert 0 < partial.part.stat().st_size < len(WEIGHTS)
    assert partial.resumable_bytes(partial.describe(REPO, repo_hub.commit(REPO), weights)) == calls.bytes


# ----------------------------------------------------------------- the queue


def test_queue_runs_in_order_and_a_second_pull_joins_the_first() -> None:
    release = threading.Event()
    ran: list[str] = []

    def run(job: DownloadJob) -> None:
        ran.append(job.model_id)
        release.wait(30)

    queue = DownloadQueue(run, max_concurrent=1)
    try:
        first, joined_first = queue.submit("a", None)
        second, _ = queue.submit("b", None)
        again, joined_again = queue.submit("a", None)
        joined = queue.join("b")

        assert not joined_first and joined_again and again is first
        assert joined is second
        assert (first.joiners, second.joiners) == (2, 2)  # each join counted once
        assert queue.waiting_ids() in (["a", "b"], ["b"])
        release.set()
        assert first.done_event.wait(30) and second.done_event.wait(30)
        assert ran == ["a", "b"] and first.error is None
        assert queue.active("a") is None and queue.join("a") is None
    finally:
        release.set()
        queue.stop()


def test_queue_cancel_of_a_waiting_job_finishes_it_cancelled() -> None:
    started, release = threading.Event(), threading.Event()

    def run(job: DownloadJob) -> None:
        started.set()
        release.wait(30)

    queue = DownloadQueue(run, max_concurrent=1)
    try:
        running, _ = queue.submit("a", None)
        assert started.wait(30)
        waiting, _ = queue.submit("b", None)
        assert queue.waiting_ids() == ["b"] and running.running
        ended: list[BaseException | None] = []
        waiting.add_done_callback(lambda: ended.append(waiting.error))

        assert queue.cancel("b") is waiting

        assert waiting.done_event.is_set() and isinstance(waiting.error, DownloadCancelled)
        assert len(ended) == 1 and queue.waiting_ids() == []
        assert queue.cancel("b") is None
    finally:
        release.set()
        queue.stop()
    assert running.done_event.is_set()
