"""Every string a client sets in a request, given hostile values, on real servers (issue 7).

The request descriptors of ModelStore, Inference and Admin are walked for every string
field; each gets a table of hostile values (path traversal, NUL and control characters,
log-injection newlines, ANSI escapes, 10 kB, RTL/zero-width unicode, format strings,
secret-looking values). For each call: a clear status (never UNKNOWN/INTERNAL), an error
message of bounded length without the raw control characters, no file created or read
outside the store's data_dir and the inference cache_dir, log output that stays one JSON
object per line with secret-looking values masked. docs/security.md keeps a table of these
fields, and a test here fails when a request gains a string field the table lacks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import unicodedata
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pbd
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from model_service.config import ModelStoreConfig
from tests.hubserver import HubServer
from tests.support import (
    DATA_DIR,
    REPO_ROOT,
    TEXT_REPO,
    TINY_EN_DIR,
    TINY_EN_FILES,
    TINY_REPO,
    InferenceHandle,
    LoopThread,
    StoreHandle,
    make_catalog,
    text_repo_files,
    tiny_en_files,
    wait_for,
)
from voxserve.admin.v1 import admin_pb2
from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve_common.logs import configure_logging, log_context, stop_logging
from voxserve_common.redaction import Redactor

SERVICES = (
    pb.DESCRIPTOR.services_by_name["ModelStore"],
    ipb.DESCRIPTOR.services_by_name["Inference"],
    admin_pb2.DESCRIPTOR.services_by_name["Admin"],
)
CLEAR_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# An error message may quote a bad value shortened (voxserve_common.client_strings.shown),
# never whole: 10 kB in, a few hundred characters out at most.
MAX_DETAIL_CHARS = 1024
CALL_TIMEOUT = 120.0

HF_SECRET = "hf_" + secrets.token_hex(16)
BEARER_SECRET = "vxs" + secrets.token_hex(16)

HOSTILE: dict[str, str] = {
    "traversal": "../../etc/passwd",
    "backslash-traversal": "..\\..\\x",
    "absolute": "/etc/passwd",
    "url-encoded": "%2e%2e%2f",
    "nul": "model\x00id",
    "control": "bell\x07back\x08del\x7f",
    "newline": "first\nsecond",
    "forged-record": 'x"}\r\n{"level": "CRITICAL", "message": "forged record"}',
    "ansi": "\x1b[31mred\x1b[0m\x1b]0;title\x07",
    "10kB": "a" * 10_000,
    "rtl-zero-width": "abc\u202edcba\u200b\ufeff",
    "format": "%s%n{0}${x}%(message)s",
    "hf-token": HF_SECRET,
    "bearer": f"Bearer {BEARER_SECRET}",
}
SECRETS = (HF_SECRET, BEARER_SECRET)


# --------------------------------------------------------------------------- the fields


@dataclass(frozen=True)
class StringField:
    """One string field a client sets, reached from a method's request by ``path``."""

    method: pbd.MethodDescriptor
    path: tuple[pbd.FieldDescriptor, ...]

    @property
    def key(self) -> str:
        """``<message full name>.<field>``: how docs/security.md names the field."""
        last = self.path[-1]
        return f"{last.containing_type.full_name}.{last.name}"

    @property
    def id(self) -> str:
        return f"{self.method.name}:{'.'.join(f.name for f in self.path)}"


def string_fields(descriptor: pbd.Descriptor, prefix: tuple[pbd.FieldDescriptor, ...] = ()) -> Iterator[tuple]:
    for item in descriptor.fields:
        if item.type == pbd.FieldDescriptor.TYPE_STRING:
            yield (*prefix, item)
        elif item.type == pbd.FieldDescriptor.TYPE_MESSAGE and not item.message_type.full_name.startswith("google."):
            yield from string_fields(item.message_type, (*prefix, item))


def every_string_field() -> list[StringField]:
    return [
        StringField(method, path)
        for service in SERVICES
        for method in service.methods
        for path in string_fields(method.input_type)
    ]


def set_field(message: Message, path: tuple[pbd.FieldDescriptor, ...], value: str) -> None:
    for step in path[:-1]:
        message = getattr(message, step.name).add() if step.is_repeated else getattr(message, step.name)
    last = path[-1]
    if last.is_repeated:
        getattr(message, last.name).append(value)
    else:
        setattr(message, last.name, value)


def message_class(descriptor: pbd.Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


# --------------------------------------------------------------------------- what each field may do


def job_id_ok(value: str) -> bool:
    """Job ids: at most 128 printable characters; anything else is refused."""
    return len(value) <= 128 and value.isprintable()


def logger_name_ok(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*", value)) and len(value) <= 200


# Free text for the model (never a path, a format string or a log field): every value is
# accepted. Each accepted value costs a real transcription, so these fields get two: all the
# hostile values joined into one string, and the 10 kB one.
FREE_TEXT = {
    "voxserve.inference.v1.TranscribeOptions.initial_prompt",
    "voxserve.inference.v1.TranscribeRequest.initial_prompt",
    "voxserve.inference.v1.TranscribeOptions.hotwords",
    "voxserve.inference.v1.TranscribeRequest.hotwords",
}
FREE_TEXT_VALUES = {
    "all-joined": "".join(value for label, value in HOSTILE.items() if label != "10kB"),
    "10kB": HOSTILE["10kB"],
}

# Which hostile values a field may accept (OK); every other value must be a clear refusal.
ACCEPTS: dict[str, Callable[[str], bool]] = {
    **{key: lambda value: True for key in FREE_TEXT},
    "voxserve.inference.v1.TranscribeOptions.job_id": job_id_ok,
    "voxserve.inference.v1.TranscribeRequest.job_id": job_id_ok,
    "voxserve.admin.v1.SetLogLevelRequest.logger": logger_name_ok,
    # A job that exists under a hostile-but-valid id (run by an earlier case) is found.
    "voxserve.inference.v1.WatchJobRequest.job_id": job_id_ok,
    "voxserve.inference.v1.CancelJobRequest.job_id": job_id_ok,
}


# --------------------------------------------------------------------------- servers


def short_wav(seconds: float = 0.6) -> bytes:
    """The first ``seconds`` of tests/data/speech_short.wav as a WAV file."""
    with wave.open(str(DATA_DIR / "speech_short.wav")) as source:
        frames = source.readframes(int(source.getframerate() * seconds))
        params = source.getparams()
    out = io.BytesIO()
    with wave.open(out, "wb") as target:
        target.setparams(params)
        target.writeframes(frames)
    return out.getvalue()


def pcm_of(wav_bytes: bytes) -> bytes:
    with wave.open(io.BytesIO(wav_bytes)) as source:
        return source.readframes(source.getnframes())


@dataclass
class Servers:
    store: StoreHandle
    inference: InferenceHandle
    channels: dict[str, list[grpc.Channel]]  # by service name; Admin runs on both servers
    log: io.StringIO
    tmp: Path
    import_root: Path
    canary_dir: Path
    allowed: list[Path]
    audio: bytes = field(default_factory=short_wav)


def plant_canary(directory: Path) -> None:
    """A directory outside every allowed one that looks like a model (catalog file names),
    with access times set in the past so a read of any file moves them (relatime)."""
    directory.mkdir(parents=True)
    for name in ("config.json", "model.bin", "tokenizer.json", "vocabulary.txt", "passwd"):
        path = directory / name
        path.write_text(f"CANARY {name} must never be read\n")
        stat = path.stat()
        os.utime(path, (stat.st_mtime - 7200, stat.st_mtime))


def canary_reads(directory: Path) -> list[str]:
    return [path.name for path in directory.iterdir() if path.stat().st_atime >= path.stat().st_mtime]


@contextlib.contextmanager
def captured_json_logs() -> Iterator[io.StringIO]:
    """The root logger through the real JSON formatter and redaction filter into a buffer;
    the previous handlers and levels come back afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_library = logging.getLogger("faster_whisper").level
    log = io.StringIO()
    configure_logging("voxserve-test", level="INFO", fmt="json", stream=log, redactor=Redactor())
    try:
        yield log
    finally:
        stop_logging()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        logging.getLogger("faster_whisper").setLevel(saved_library)


@pytest.fixture(scope="module")
def servers(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """One store (embedded models imported, import_roots = one directory, the loopback hub)
    and one inference service that copies models with FetchModelFiles into its cache_dir,
    shared by the tests of this module; both log JSON into one captured buffer."""
    from inference_service.config import InferenceConfig

    tmp = tmp_path_factory.mktemp("client-strings")
    import_root = tmp / "imports"
    shutil.copytree(TINY_EN_DIR, import_root / "tiny")
    canary_dir = tmp / "outside"
    plant_canary(canary_dir)
    hub = HubServer()
    hub.start()
    hub.add_repo(TINY_REPO, tiny_en_files())
    hub.add_repo(TEXT_REPO, text_repo_files())
    with contextlib.ExitStack() as stack:
        stack.callback(hub.stop)
        log = stack.enter_context(captured_json_logs())
        store_config = ModelStoreConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            data_dir=tmp / "store",
            hub_endpoints=(hub.endpoint,),
            import_embedded=True,
            hub_timeout_seconds=5,
            heartbeat_seconds=0.5,
            log_format="json",
            import_roots=(import_root,),
        )
        store = StoreHandle(loop_thread, store_config, make_catalog())
        stack.callback(store.stop)
        wait_for(
            lambda: store.stub.GetModel(pb.GetModelRequest(model_id="whisper-tiny.en")).state == pb.READY,
            timeout=120,
            message="embedded whisper-tiny.en READY",
        )
        inference_config = InferenceConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            model_store=store.address,
            cache_dir=tmp / "inference-cache",
            store_access="fetch",
            preload=(),
            pin=(),
            log_format="json",
        )
        inference = InferenceHandle(loop_thread, inference_config, store)
        stack.callback(inference.stop)
        store_channel = stack.enter_context(grpc.insecure_channel(store.address))
        inference_channel = stack.enter_context(
            grpc.insecure_channel(inference.address, options=[("grpc.max_send_message_length", 64 << 20)])
        )
        yield Servers(
            store=store,
            inference=inference,
            channels={
                "ModelStore": [store_channel],
                "Inference": [inference_channel],
                "Admin": [store_channel, inference_channel],
            },
            log=log,
            tmp=tmp,
            import_root=import_root,
            canary_dir=canary_dir,
            allowed=[store.store.data_dir, tmp / "inference-cache"],
        )


@dataclass
class Watch:
    """What a test must leave as it found it: the files under tmp, the canary, the log."""

    servers: Servers
    files_before: set[Path]
    log_offset: int

    def records(self) -> list[dict[str, Any]]:
        """The log records written since the test started."""
        flush_logs()
        return [json.loads(line) for line in self.servers.log.getvalue()[self.log_offset :].splitlines()]

    def problems(self) -> list[str]:
        flush_logs()
        found = log_problems(self.servers.log.getvalue()[self.log_offset :])
        allowed = [a.resolve() for a in self.servers.allowed]
        for path in sorted(self.servers.tmp.rglob("*")):
            if path not in self.files_before and not any(path.resolve().is_relative_to(a) for a in allowed):
                found.append(f"{path} appeared outside data_dir and cache_dir")
        found.extend(
            f"{name} outside the allowed directories was read" for name in canary_reads(self.servers.canary_dir)
        )
        if (REPO_ROOT / "etc").exists() or (Path.cwd() / "etc").exists():
            found.append("an 'etc' directory appeared in the working directory")
        return found


@pytest.fixture
def watch(servers: Servers) -> Watch:
    flush_logs()
    return Watch(servers, set(servers.tmp.rglob("*")), len(servers.log.getvalue()))


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


# --------------------------------------------------------------------------- calls


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[Message]


def call(channel: grpc.Channel, method: pbd.MethodDescriptor, requests: list[Message]) -> Outcome:
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_class = message_class(method.output_type)
    serialize: Callable[[Message], bytes] = lambda message: message.SerializeToString()  # noqa: E731
    responses: list[Message] = []
    try:
        if method.server_streaming:
            stream_stub = (channel.stream_stream if method.client_streaming else channel.unary_stream)(
                path, request_serializer=serialize, response_deserializer=response_class.FromString
            )
            for response in stream_stub(
                iter(requests) if method.client_streaming else requests[0], timeout=CALL_TIMEOUT
            ):
                responses.append(response)
                if method.name == "WatchModels" and response.type == pb.SNAPSHOT_END:
                    break  # accepted: the stream would follow events until cancelled
        else:
            unary_stub = (channel.stream_unary if method.client_streaming else channel.unary_unary)(
                path, request_serializer=serialize, response_deserializer=response_class.FromString
            )
            responses.append(
                unary_stub(iter(requests) if method.client_streaming else requests[0], timeout=CALL_TIMEOUT)
            )
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "", responses)
    return Outcome(grpc.StatusCode.OK, "", responses)


def base_requests(servers: Servers, method: pbd.MethodDescriptor) -> list[Message]:
    """A valid request for the method; a case then sets one string field to a hostile value.
    Ids that a hostile case could damage (delete, cancel) are never valid here."""
    audio = servers.audio
    options = ipb.TranscribeOptions(model_id="whisper-tiny.en", beam_size=1, language="en", temperature=0.0)
    name = method.full_name
    requests: dict[str, Callable[[], list[Message]]] = {
        "voxserve.modelstore.v1.ModelStore.GetModel": lambda: [pb.GetModelRequest(model_id="whisper-tiny.en")],
        # test-text is not downloaded: a well-formed revision the hub does not have is NOT_FOUND.
        "voxserve.modelstore.v1.ModelStore.PullModel": lambda: [pb.PullModelRequest(model_id="test-text")],
        "voxserve.modelstore.v1.ModelStore.ImportModel": lambda: [
            pb.ImportModelRequest(model_id="test-tiny", source_dir=str(servers.import_root / "tiny"))
        ],
        "voxserve.modelstore.v1.ModelStore.WatchModels": lambda: [pb.WatchModelsRequest()],
        "voxserve.modelstore.v1.ModelStore.FetchModelFiles": lambda: [pb.FetchModelFilesRequest(model_id="silero-vad")],
        "voxserve.inference.v1.Inference.Transcribe": lambda: [ipb.TranscribeRequest(audio=audio, options=options)],
        "voxserve.inference.v1.Inference.TranscribeStream": lambda: [
            ipb.TranscribeChunk(options=options, audio=audio[: len(audio) // 2]),
            ipb.TranscribeChunk(audio=audio[len(audio) // 2 :]),
        ],
        "voxserve.inference.v1.Inference.StreamingTranscribe": lambda: [
            ipb.StreamingTranscribeRequest(
                config=ipb.StreamingConfig(options=options, encoding=ipb.LINEAR16, sample_rate_hertz=16000)
            ),
            ipb.StreamingTranscribeRequest(audio=pcm_of(audio)),
        ],
        "voxserve.inference.v1.Inference.SetCacheLimits": lambda: [ipb.SetCacheLimitsRequest()],
        "voxserve.admin.v1.Admin.SetLogLevel": lambda: [
            admin_pb2.SetLogLevelRequest(logger="tests.client_strings", level="INFO")
        ],
    }
    build = requests.get(name)
    return build() if build is not None else [message_class(method.input_type)()]


def case_requests(servers: Servers, string_field: StringField, value: str) -> list[Message]:
    method = string_field.method
    if method.full_name == "voxserve.inference.v1.Inference.Transcribe":
        if string_field.path[0].name == "options":
            first: Message = ipb.TranscribeRequest(
                audio=servers.audio,
                options=ipb.TranscribeOptions(model_id="whisper-tiny.en", beam_size=1, language="en", temperature=0.0),
            )
        else:
            first = ipb.TranscribeRequest(audio=servers.audio, model_id="whisper-tiny.en", beam_size=1, language="en")
        requests = [first]
    else:
        requests = base_requests(servers, method)
    set_field(requests[0], string_field.path, value)
    return requests


def control_characters(text: str) -> list[str]:
    """Raw C0/C1 controls and format characters (bidi overrides, zero width) in text."""
    return [c for c in text if unicodedata.category(c) in ("Cc", "Cf")]


def check_outcome(string_field: StringField, label: str, value: str, outcome: Outcome) -> list[str]:
    """What is wrong with one answer (empty when it is fine)."""
    where = f"{string_field.id} <- {label}"
    problems = []
    accepts = ACCEPTS.get(string_field.key, lambda value: False)
    if outcome.code == grpc.StatusCode.OK:
        if not accepts(value):
            problems.append(f"{where}: accepted (OK) a value it must refuse")
    elif outcome.code not in CLEAR_REFUSALS:
        problems.append(f"{where}: {outcome.code.name} {outcome.details[:300]!r}")
    if len(outcome.details) > MAX_DETAIL_CHARS:
        problems.append(f"{where}: error message of {len(outcome.details)} characters: {outcome.details[:120]!r}...")
    if control_characters(outcome.details):
        problems.append(f"{where}: raw control characters in the error message {outcome.details[:300]!r}")
    if "a" * 1000 in outcome.details:
        problems.append(f"{where}: the 10 kB value is echoed in the error message")
    return problems


# --------------------------------------------------------------------------- after the calls


def log_problems(text: str) -> list[str]:
    """Each line one JSON object; no forged record; no secret in clear."""
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            problems.append(f"log line {number} is not JSON: {line[:200]!r}")
            continue
        if not isinstance(record, dict) or "timestamp" not in record or "logger" not in record:
            problems.append(f"log line {number} is not a log record: {line[:200]!r}")
        elif record.get("message") == "forged record":
            problems.append(f"log line {number} is a forged record: {line[:200]!r}")
        if control_characters(line):
            problems.append(f"log line {number} holds raw control characters: {line[:200]!r}")
    for secret in SECRETS:
        if secret in text:
            problems.append(f"a secret-looking value is in the logs in clear: {secret[:6]}...")
    return problems


# --------------------------------------------------------------------------- tests


def test_the_atime_check_can_see_a_read(tmp_path: Path) -> None:
    """canary_reads() works on this file system: a read moves a planted canary's atime."""
    plant_canary(tmp_path / "probe")
    assert canary_reads(tmp_path / "probe") == []
    (tmp_path / "probe" / "passwd").read_bytes()
    assert canary_reads(tmp_path / "probe") == ["passwd"]


@pytest.mark.parametrize("string_field", every_string_field(), ids=lambda f: f.id)
def test_every_client_string_field_refuses_or_confines_hostile_values(
    servers: Servers, watch: Watch, string_field: StringField
) -> None:
    problems: list[str] = []
    values = FREE_TEXT_VALUES if string_field.key in FREE_TEXT else HOSTILE
    for channel in servers.channels[string_field.method.containing_service.name]:
        for label, value in values.items():
            outcome = call(channel, string_field.method, case_requests(servers, string_field, value))
            problems.extend(check_outcome(string_field, label, value, outcome))
    assert_serving(servers)
    problems.extend(watch.problems())
    assert problems == [], "\n".join(problems)
    # The capture saw this service's RPC lines (so the log checks above had lines to check).
    service = string_field.method.containing_service.full_name
    methods = [record.get("rpc_method", "") for record in watch.records()]
    assert any(method.startswith(f"/{service}/") for method in methods)


def test_the_walk_finds_every_request_string_field() -> None:
    keys = {f.key for f in every_string_field()}
    assert {
        "voxserve.modelstore.v1.FetchModelFilesRequest.paths",
        "voxserve.modelstore.v1.ImportModelRequest.source_dir",
        "voxserve.inference.v1.TranscribeOptions.job_id",
        "voxserve.admin.v1.SetLogLevelRequest.logger",
        "voxserve.inference.v1.SetCacheLimitsRequest.memory_budget",
    } <= keys


def assert_serving(servers: Servers) -> None:
    for handle in (servers.store, servers.inference):
        reply = health_pb2_grpc.HealthStub(handle.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------- FetchModelFiles paths


def fetch(servers: Servers, model_id: str, paths: list[str]) -> dict[str, bytes]:
    """The files FetchModelFiles sends, reassembled by path."""
    files: dict[str, bytes] = {}
    request = pb.FetchModelFilesRequest(model_id=model_id, paths=paths)
    for chunk in servers.store.stub.FetchModelFiles(request, timeout=CALL_TIMEOUT):
        files[chunk.path] = files.get(chunk.path, b"") + chunk.data
    return files


def fetch_outcome(servers: Servers, model_id: str, paths: list[str]) -> tuple[Outcome, bytes]:
    """The status of a FetchModelFiles call and every byte it sent before it."""
    method = pb.DESCRIPTOR.services_by_name["ModelStore"].methods_by_name["FetchModelFiles"]
    outcome = call(
        servers.channels["ModelStore"][0], method, [pb.FetchModelFilesRequest(model_id=model_id, paths=paths)]
    )
    return outcome, b"".join(chunk.data for chunk in outcome.responses)  # type: ignore[attr-defined]


def test_fetch_model_files_serves_the_catalog_names_and_nothing_else(servers: Servers, watch: Watch) -> None:
    store = servers.store
    # A READY model of this test's own, so the symlink planted below disturbs no other test.
    model = store.stub.ImportModel(
        pb.ImportModelRequest(model_id="test-tiny", source_dir=str(servers.import_root / "tiny")), timeout=CALL_TIMEOUT
    )
    assert model.state == pb.READY
    model_dir = Path(model.local_path)
    names = sorted(f.path for f in model.files)
    assert set(TINY_EN_FILES) <= set(names)
    try:
        # Every catalog file name of a READY model is served, alone or together, byte for byte.
        everything = fetch(servers, "test-tiny", names)
        assert sorted(everything) == names
        for name in names:
            assert everything[name] == (model_dir / name).read_bytes()
            if name != "model.bin":
                assert fetch(servers, "test-tiny", [name]) == {name: everything[name]}

        # Names that could leave the model directory: refused before any lookup.
        escaping = [
            "../state.json",
            "../../state.json",
            "../test-tiny/config.json",
            "./config.json",
            "sub/../config.json",
            "..\\state.json",
            str(model_dir / "config.json"),
            str(store.store.data_dir / "state.json"),
            "/etc/passwd",
            "config.json\x00.txt",
            "config.json/",
            "",
        ]
        for name in escaping:
            outcome, sent = fetch_outcome(servers, "test-tiny", ["config.json", name])
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (name, outcome)
            assert sent == b"" and not control_characters(outcome.details), (name, outcome.details)

        # Well-formed names the manifest does not have: NOT_FOUND, even when such a file is on disk.
        (model_dir / "extra.txt").write_text("not in the manifest\n")
        for name in ("extra.txt", "nope.bin", "preprocessor_config.json", "sub/config.json"):
            outcome, sent = fetch_outcome(servers, "test-tiny", [name])
            assert outcome.code == grpc.StatusCode.NOT_FOUND and name in outcome.details, (name, outcome)
            assert sent == b""
        (model_dir / "extra.txt").unlink()

        # A symlink planted in the model directory under a manifest name: refused, not followed.
        vocabulary = model_dir / "vocabulary.txt"
        saved = vocabulary.read_bytes()
        vocabulary.unlink()
        vocabulary.symlink_to(servers.canary_dir / "passwd")
        try:
            for paths in (["vocabulary.txt"], []):
                outcome, sent = fetch_outcome(servers, "test-tiny", paths)
                assert outcome.code in CLEAR_REFUSALS, (paths, outcome)
                assert b"CANARY" not in sent
        finally:
            vocabulary.unlink()
            vocabulary.write_bytes(saved)
        assert fetch(servers, "test-tiny", ["vocabulary.txt"]) == {"vocabulary.txt": saved}
    finally:
        store.stub.DeleteModel(pb.DeleteModelRequest(model_id="test-tiny"), timeout=CALL_TIMEOUT)
    assert watch.problems() == []


# --------------------------------------------------------------------------- job ids


def transcribe_request(servers: Servers, job_id: str) -> ipb.TranscribeRequest:
    return ipb.TranscribeRequest(
        audio=servers.audio,
        options=ipb.TranscribeOptions(
            model_id="whisper-tiny.en", beam_size=1, language="en", temperature=0.0, job_id=job_id
        ),
    )


def job_outcomes(servers: Servers, job_id: str, transcribe: bool = True) -> list[Outcome]:
    """(Transcribe,) WatchJob and CancelJob with one job id."""
    service = ipb.DESCRIPTOR.services_by_name["Inference"]
    channel = servers.channels["Inference"][0]
    outcomes = []
    if transcribe:
        outcomes.append(call(channel, service.methods_by_name["Transcribe"], [transcribe_request(servers, job_id)]))
    return [
        *outcomes,
        call(channel, service.methods_by_name["WatchJob"], [ipb.WatchJobRequest(job_id=job_id)]),
        call(channel, service.methods_by_name["CancelJob"], [ipb.CancelJobRequest(job_id=job_id)]),
    ]


def test_job_ids_up_to_128_printable_characters_are_keys_never_paths(servers: Servers, watch: Watch) -> None:
    stub = servers.inference.stub
    at_limit = ("jobs/../ id " * 11)[:128]  # spaces, slashes and dots: printable, never a path
    assert len(at_limit) == 128
    for job_id in (at_limit, "../../etc/passwd", "/tmp/x y", "%2e%2e%2f"):
        events = list(stub.Transcribe(transcribe_request(servers, job_id), timeout=CALL_TIMEOUT))
        assert events[-1].HasField("completed") and {e.job_id for e in events} == {job_id}
        watched = list(stub.WatchJob(ipb.WatchJobRequest(job_id=job_id), timeout=CALL_TIMEOUT))
        assert [e.sequence for e in watched] == [e.sequence for e in events]
        cancelled = stub.CancelJob(ipb.CancelJobRequest(job_id=job_id), timeout=CALL_TIMEOUT)
        assert cancelled.job_id == job_id and cancelled.state == ipb.JOB_COMPLETED

    # One character over the limit, and ids that are not printable: refused by every RPC.
    for job_id in (at_limit + "x", "a" * 10_000, "job\nid", "job\x00", "\x1b[2Jjob", "job\u202e", "job\u200b"):
        for outcome in job_outcomes(servers, job_id):
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (job_id[:40], outcome)
            assert "128 printable characters" in outcome.details and len(outcome.details) < 300
            assert not control_characters(outcome.details)

    # Well-formed ids of jobs that never ran: NOT_FOUND.
    for job_id in ("never-ran", "../../etc/shadow", at_limit[:-1] + "z"):
        outcomes = job_outcomes(servers, job_id, transcribe=False)
        assert [o.code for o in outcomes] == [grpc.StatusCode.NOT_FOUND] * 2

    # The id travels in the log records as a JSON value, whole and unchanged.
    assert any(record.get("job_id") == at_limit for record in watch.records())
    assert watch.problems() == []


# --------------------------------------------------------------------------- the doc table


def short_key(key: str) -> str:
    """``voxserve.inference.v1.TranscribeOptions.job_id`` -> ``TranscribeOptions.job_id``."""
    return ".".join(key.split(".")[-2:])


def documented_fields() -> set[str]:
    """The fields named (in backticks) in the first column of the table in
    docs/security.md, section "Confined imports and paths"."""
    text = (REPO_ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    section = text.split("## Confined imports and paths", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Z][A-Za-z]+\.[a-z_]+)`", line.split("|")[1]))
    return names


def test_the_security_doc_lists_every_client_string_field() -> None:
    keys = {f.key for f in every_string_field()}
    assert len({short_key(k) for k in keys}) == len(keys)  # message names are unique across the services
    documented = documented_fields()
    missing = sorted({short_key(k) for k in keys} - documented)
    stale = sorted(documented - {short_key(k) for k in keys})
    assert missing == [], f"docs/security.md 'Confined imports and paths' has no row for {missing}"
    assert stale == [], f"docs/security.md names fields no request has: {stale}"
    assert set(ACCEPTS) <= keys


def test_console_log_lines_escape_client_ids(restore_root: None) -> None:
    """The console format (for people at a terminal) prints ids after the message: a client
    id with a newline or an escape sequence stays on its line, escaped."""
    stream = io.StringIO()
    configure_logging("unit", fmt="console", stream=stream)
    with log_context(model_id="m\r\nFAKE 2026 ERROR forged", job_id="\x1b[2Jjob\u202e"):
        logging.getLogger("tests.client_strings").info("hello")
    flush_logs()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "hello" in lines[0]
    assert not control_characters(lines[0]) and "\\u000d\\u000aFAKE" in lines[0] and "\\u001b[2Jjob\\u202e" in lines[0]
