"""DEBUG set at run time (Admin/SetLogLevel) makes every RPC log its request's fields, on a
real inference service with tokens: client strings escaped and cut, audio as its length,
no token and no credential in any record; at INFO no request is logged."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import yaml

from tests.support import DATA_DIR, InferenceHandle
from voxserve.admin.v1 import admin_pb2, admin_pb2_grpc
from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve.modelstore.v1 import modelstore_pb2 as mpb
from voxserve_common.logs import json_formatter
from voxserve_common.redaction import MASK
from voxserve_common.rpc_requests import fields_text, request_fields

OPS_TOKEN = "tok-ops-5e0c91d2"
CLIENT_TOKEN = "tok-client-8a7f3b64"
HUB_TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUv"  # a Hugging Face token pasted into a prompt


def _tokens_file(directory: Path) -> Path:
    path = directory / "tokens.yaml"
    entries = {
        "ops": {"sha256": hashlib.sha256(OPS_TOKEN.encode()).hexdigest(), "roles": ["admin"]},
        "client": {"sha256": hashlib.sha256(CLIENT_TOKEN.encode()).hexdigest(), "roles": ["read", "transcribe"]},
    }
    path.write_text(yaml.safe_dump({"tokens": entries}))
    return path


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _request_records(records: list[logging.LogRecord], message_type: str) -> list[logging.LogRecord]:
    return [r for r in records if getattr(r, "request_type", "").endswith(f".{message_type}")]


def _set_root_level(admin: admin_pb2_grpc.AdminStub, level: str) -> str:
    """Admin/SetLogLevel on the root logger, as `voxctl log-level root LEVEL` does; the previous level."""
    reply = admin.SetLogLevel(
        admin_pb2.SetLogLevelRequest(logger="root", level=level), metadata=_bearer(OPS_TOKEN), timeout=30
    )
    return reply.previous_level


def test_debug_logs_request_fields_without_audio_or_secrets(
    start_inference: Callable[..., InferenceHandle], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = start_inference(auth_tokens=_tokens_file(tmp_path))
    admin = admin_pb2_grpc.AdminStub(service.channel)
    audio = (DATA_DIR / "speech_short.wav").read_bytes()
    options = ipb.TranscribeOptions(
        job_id="debug-job-1",
        hotwords="\x1b[31mred\u202e",  # an escape sequence a terminal would obey, a bidi override
        initial_prompt=f"my key is {HUB_TOKEN}, and a very long prompt " + "la " * 60,
    )
    with pytest.raises(grpc.RpcError) as refused:  # tokens are on: the token below is what lets a call in
        service.stub.ListLoadedModels(ipb.ListLoadedModelsRequest(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    original = _set_root_level(admin, "INFO")
    try:
        service.stub.ListLoadedModels(ipb.ListLoadedModelsRequest(), metadata=_bearer(CLIENT_TOKEN), timeout=30)
        assert not _request_records(caplog.records, "ListLoadedModelsRequest"), "no request record at INFO"
        _set_root_level(admin, "DEBUG")
        service.stub.ListLoadedModels(ipb.ListLoadedModelsRequest(), metadata=_bearer(CLIENT_TOKEN), timeout=30)
        (listed,) = _request_records(caplog.records, "ListLoadedModelsRequest")
        assert listed.getMessage() == "rpc request: (no fields set)"
        events = list(
            service.stub.Transcribe(
                ipb.TranscribeRequest(options=options, audio=audio), metadata=_bearer(CLIENT_TOKEN), timeout=300
            )
        )
        assert events[-1].WhichOneof("event") == "completed"
        chunks = [ipb.TranscribeChunk(options=ipb.TranscribeOptions(), audio=audio[:4000])]
        chunks += [ipb.TranscribeChunk(audio=audio[i : i + 4000]) for i in range(4000, len(audio), 4000)]
        streamed = list(service.stub.TranscribeStream(iter(chunks), metadata=_bearer(CLIENT_TOKEN), timeout=300))
        assert streamed[-1].WhichOneof("event") == "completed"
    finally:
        _set_root_level(admin, original)

    (record,) = _request_records(caplog.records, "TranscribeRequest")
    assert record.levelno == logging.DEBUG and record.name == "voxserve_common.rpc_requests"
    fields = record.request  # type: ignore[attr-defined]
    assert fields["audio"] == f"<{len(audio)} bytes>"
    assert fields["options"]["job_id"] == "'debug-job-1'"
    assert fields["options"]["hotwords"] == "'\\x1b[31mred\\u202e'"  # escaped: no raw control character
    prompt = fields["options"]["initial_prompt"]
    assert prompt.startswith("'my key is hf_" + MASK) and prompt.endswith("characters)")  # cut to 80
    assert f"audio=<{len(audio)} bytes>" in record.getMessage()

    (first,) = _request_records(caplog.records, "TranscribeChunk")  # the first chunk only
    assert first.request == {"options": {}, "audio": "<4000 bytes>"}  # type: ignore[attr-defined]
    assert first.request_stream is True  # type: ignore[attr-defined]
    # The store's own interceptor logged the inference service's calls to it (same trace).
    assert _request_records(caplog.records, "ListModelsRequest") or _request_records(caplog.records, "GetModelRequest")

    formatter = json_formatter()
    lines = [formatter.format(r) for r in caplog.records]
    leaks = [line for line in lines for secret in (OPS_TOKEN, CLIENT_TOKEN, HUB_TOKEN) if secret in line]
    assert not leaks
    audio_marks = ("RIFF", audio[44:84].hex(), base64.b64encode(audio[:60]).decode(), repr(audio[44:64])[2:-1])
    assert not [line for line in lines for mark in audio_marks if mark in line]


def test_request_fields_mask_credentials_and_bound_lists() -> None:
    pull = mpb.PullModelRequest(model_id="whisper-tiny.en", source="https://alice:s3cret-pw@mirror.example/hub")
    fields = request_fields(pull)
    assert fields == {"model_id": "'whisper-tiny.en'", "source": f"'https://alice:{MASK}@mirror.example/hub'"}
    watch = mpb.WatchModelsRequest(model_ids=[f"m{i}" for i in range(40)], types=[mpb.STATE_CHANGED])
    shown = request_fields(watch)
    assert shown["model_ids"][:2] == ["'m0'", "'m1'"] and shown["model_ids"][-1] == "... (40 items)"
    assert len(shown["model_ids"]) == 17
    assert shown["types"] == ["STATE_CHANGED"]
    assert fields_text(request_fields(mpb.ListModelsRequest())) == "(no fields set)"
