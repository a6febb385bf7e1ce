"""HubClient against the loopback hub: manifests (sizes, hashes, filters, refusals) and ranged file reads."""

from __future__ import annotations

import hashlib

import pytest

from model_service.catalog import CatalogEntry
from model_service.errors import UnsafePath
from model_service.store.download.hub import HubClient, SourceError
from model_service.store.download.sources import OFFICIAL_ENDPOINT, default_sources
from tests.hubserver import HubServer, git_blob_sha1, refused_endpoint

REPO = "unit-org/hub-client"
WEIGHTS = bytes(range(256)) * 6144  # 1.5 MiB: stored as LFS, so the hub gives its sha256
FILES = {
    "config.json": b'{"layers": 2}\n',
    "weights.bin": WEIGHTS,
    "docs/readme.md": b"# not a model file\n",
}


def entry(**overrides: object) -> CatalogEntry:
    fields: dict[str, object] = {
        "model_id": "unit",
        "kind": "whisper",
        "repo_id": REPO,
        "revision": "main",
        "allow_patterns": ("*.json", "*.bin"),
        "required_files": ("config.json",),
    }
    fields.update(overrides)
    return CatalogEntry(**fields)  # type: ignore[arg-type]


@pytest.fixture
def repo_hub(hub: HubServer) -> HubServer:
    hub.add_repo(REPO, FILES)
    return hub


def client(*endpoints: str) -> HubClient:
    return HubClient(endpoints, timeout=5)


def test_manifest_lists_allowed_files_with_sizes_and_hashes(repo_hub: HubServer) -> None:
    manifest = client(repo_hub.endpoint).manifest(repo_hub.endpoint, entry(), "main")

    assert manifest.commit == repo_hub.commit(REPO)
    assert manifest.endpoint == repo_hub.endpoint
    assert [f.path for f in manifest.files] == ["config.json", "weights.bin"]  # sorted, docs filtered out
    config, weights = manifest.files
    assert config.size == len(FILES["config.json"])
    assert config.sha256 == ""  # a small git file: the hub gives only its blob id
    assert config.git_oid == git_blob_sha1(FILES["config.json"])
    assert weights.size == len(WEIGHTS)
    assert weights.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert manifest.total_bytes == len(FILES["config.json"]) + len(WEIGHTS)


def test_manifest_at_a_commit_sha_is_that_commit(repo_hub: HubServer) -> None:
    first = repo_hub.commit(REPO)
    repo_hub.add_repo(REPO, {**FILES, "config.json": b'{"layers": 4}\n'})
    assert repo_hub.commit(REPO) != first

    manifest = client(repo_hub.endpoint).manifest(repo_hub.endpoint, entry(), first)

    assert manifest.commit == first
    assert manifest.files[0].git_oid == git_blob_sha1(FILES["config.json"])


def test_unknown_repo_and_revision_are_definitive_not_found(repo_hub: HubServer) -> None:
    hub_client = client(repo_hub.endpoint)
    with pytest.raises(SourceError) as missing_repo:
        hub_client.manifest(repo_hub.endpoint, entry(repo_id="unit-org/nothing-here"), "main")
    assert missing_repo.value.not_found and missing_repo.value.reason == "repository not found"
    assert missing_repo.value.endpoint == repo_hub.endpoint

    with pytest.raises(SourceError) as missing_revision:
        hub_client.manifest(repo_hub.endpoint, entry(), "no-such-branch")
    assert missing_revision.value.not_found and missing_revision.value.reason == "revision not found"


def test_required_file_missing_or_nothing_allowed_is_not_found(repo_hub: HubServer) -> None:
    hub_client = client(repo_hub.endpoint)
    with pytest.raises(SourceError) as missing:
        hub_client.manifest(repo_hub.endpoint, entry(required_files=("config.json", "tokenizer.json")), "main")
    assert missing.value.not_found and "tokenizer.json" in missing.value.reason

    with pytest.raises(SourceError) as nothing:
        hub_client.manifest(repo_hub.endpoint, entry(allow_patterns=("*.onnx",)), "main")
    assert nothing.value.not_found and "*.onnx" in nothing.value.reason


def test_server_error_and_refused_connection_are_outages_not_not_found(repo_hub: HubServer) -> None:
    repo_hub.fail_with(503)
    with pytest.raises(SourceError) as outage:
        client(repo_hub.endpoint).manifest(repo_hub.endpoint, entry(), "main")
    assert not outage.value.not_found and outage.value.reason == "HTTP 503"
    repo_hub.clear_faults()

    refused = refused_endpoint()
    with pytest.raises(SourceError) as unreachable:
        client(refused).manifest(refused, entry(), "main")
    assert not unreachable.value.not_found and unreachable.value.reason.startswith("connection failed")


def test_a_hub_listing_an_escaping_file_name_is_refused(hub: HubServer) -> None:
    hub.add_repo(REPO, {"config.json": b"{}", "../escape.bin": b"x"}, allow_unsafe_paths=True)
    with pytest.raises(UnsafePath):
        client(hub.endpoint).manifest(hub.endpoint, entry(allow_patterns=()), "main")


def test_open_file_from_an_offset_sends_range_and_yields_the_rest(repo_hub: HubServer) -> None:
    commit = repo_hub.commit(REPO)
    repo_hub.reset_stats()

    with client(repo_hub.endpoint).open_file(repo_hub.endpoint, REPO, commit, "weights.bin", 1000) as (response, start):
        body = b"".join(response.iter_bytes())

    assert start == 1000 and response.status_code == 206
    assert body == WEIGHTS[1000:]
    ranges = [r.headers.get("Range") for r in repo_hub.requests if r.path.endswith("/weights.bin")]
    assert ranges == ["bytes=1000-"]
    assert repo_hub.bytes_served(REPO, "weights.bin") == len(WEIGHTS) - 1000


def test_open_file_from_zero_sends_no_range(repo_hub: HubServer) -> None:
    commit = repo_hub.commit(REPO)
    repo_hub.reset_stats()

    with client(repo_hub.endpoint).open_file(repo_hub.endpoint, REPO, commit, "config.json", 0) as (response, start):
        body = b"".join(response.iter_bytes())

    assert (start, body) == (0, FILES["config.json"])
    assert [r.headers.get("Range") for r in repo_hub.requests] == [None]


def test_open_file_errors_are_source_errors(repo_hub: HubServer) -> None:
    commit = repo_hub.commit(REPO)
    hub_client = client(repo_hub.endpoint)
    with pytest.raises(SourceError) as missing, hub_client.open_file(repo_hub.endpoint, REPO, commit, "absent.bin", 0):
        pass
    assert missing.value.not_found

    end = len(FILES["config.json"])
    with (
        pytest.raises(SourceError) as past_the_end,
        hub_client.open_file(repo_hub.endpoint, REPO, commit, "config.json", end),
    ):
        pass
    assert past_the_end.value.reason == "range not satisfiable" and not past_the_end.value.not_found


def default_endpoints(configured: tuple[str, ...], hf_endpoint: str | None) -> tuple[str, ...]:
    return tuple(source.url for source in default_sources(configured, hf_endpoint))


def test_default_endpoints_order_dedupe_and_validation() -> None:
    assert default_endpoints((), None) == (OFFICIAL_ENDPOINT,)
    assert default_endpoints((), "http://mirror:8080/") == ("http://mirror:8080", OFFICIAL_ENDPOINT)
    assert default_endpoints(("http://a/", "http://a", "https://b"), "http://ignored") == ("http://a", "https://b")
    with pytest.raises(ValueError, match="must start with http"):
        default_endpoints(("ftp://mirror",), None)
    with pytest.raises(ValueError):
        HubClient(())
