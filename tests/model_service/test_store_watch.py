"""WatchModels: snapshot, live events, resume by sequence, resync, rate limits, many watchers."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest

from tests.hubserver import HubServer
from tests.support import TINY_EN_DIR, StoreHandle, pull, wait_for
from voxserve.modelstore.v1 import modelstore_pb2 as pb

STATE_NAMES = {v: k for k, v in pb.ModelState.items()}


class Watch:
    """A WatchModels stream read by a background thread into a queue."""

    def __init__(self, handle: StoreHandle, after_sequence: int = 0, model_ids: tuple[str, ...] = ()) -> None:
        self.call = handle.stub.WatchModels(
            pb.WatchModelsRequest(after_sequence=after_sequence, model_ids=model_ids), timeout=120
        )
        self.events: queue.Queue[pb.ModelEvent | grpc.RpcError | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as error:
            self.events.put(error)
        else:
            self.events.put(None)

    def next(self, timeout: float = 30) -> pb.ModelEvent:
        item = self.events.get(timeout=timeout)
        if not isinstance(item, pb.ModelEvent):
            raise AssertionError(f"stream ended: {item!r}")
        return item

    def until(self, predicate: Callable[[pb.ModelEvent], bool], timeout: float = 60) -> list[pb.ModelEvent]:
        """Events up to and including the first one that matches."""
        seen = []
        while True:
            event = self.next(timeout)
            seen.append(event)
            if predicate(event):
                return seen

    def cancel(self) -> None:
        self.call.cancel()
        self.thread.join(10)


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    opened: list[Watch] = []
    yield opened
    for watch in opened:
        watch.call.cancel()


def is_ready(model_id: str) -> Callable[[pb.ModelEvent], bool]:
    return lambda e: e.type == pb.STATE_CHANGED and e.model_id == model_id and e.state == pb.READY


def read_snapshot(watch: Watch) -> tuple[list[pb.ModelEvent], pb.ModelEvent]:
    events = watch.until(lambda e: e.type == pb.SNAPSHOT_END)
    return events[:-1], events[-1]


def test_snapshot_then_live_events_then_heartbeat(store: StoreHandle, watches: list[Watch]) -> None:
    watch = Watch(store)
    watches.append(watch)
    snapshot, end = read_snapshot(watch)
    catalog_ids = store.store.catalog.ids()
    assert [e.type for e in snapshot] == [pb.SNAPSHOT] * len(catalog_ids)
    assert sorted(e.model_id for e in snapshot) == catalog_ids
    assert {"test-tiny", "test-text", "whisper-tiny.en", "silero-vad"} <= set(catalog_ids)
    for event in snapshot:
        assert event.HasField("model") and event.model.model_id == event.model_id
        assert event.model.state == event.state == pb.NOT_DOWNLOADED
        assert not event.resync
        assert event.sequence == end.sequence
    assert not end.resync

    assert pull(store, "test-text")[-1].state == pb.READY
    live = watch.until(is_ready("test-text"))
    live = [e for e in live if e.type != pb.HEARTBEAT]
    sequences = [e.sequence for e in live]
    assert sequences[0] > end.sequence
    assert all(b > a for a, b in itertools.pairwise(sequences)), sequences
    states = [e.state for e in live if e.type == pb.STATE_CHANGED]
    assert states[0] == pb.WAITING and states[-1] == pb.READY
    assert pb.DOWNLOADING in states and pb.VERIFYING in states
    assert any(e.type == pb.PROGRESS and e.model_id == "test-text" for e in live)
    assert {e.model_id for e in live} == {"test-text"}

    heartbeat = watch.until(lambda e: e.type == pb.HEARTBEAT)[-1]
    assert heartbeat.sequence == sequences[-1] == store.store.bus.sequence


def test_resume_after_disconnect_gets_exactly_the_missed_events(
    store: StoreHandle, hub: HubServer, watches: list[Watch]
) -> None:
    watch = Watch(store)
    watches.append(watch)
    read_snapshot(watch)
    hub.throttle(30 << 20, path="model.bin")
    pulling = threading.Thread(target=pull, args=(store, "test-tiny"), daemon=True)
    pulling.start()
    seen = watch.until(lambda e: e.type == pb.PROGRESS and e.current_file == "model.bin" and e.bytes_done > 0)
    last = seen[-1].sequence
    watch.cancel()
    wait_for(
        lambda: store.store.metrics.active_watchers.labels("WatchModels")._value.get() == 0, message="watch closed"
    )
    hub.throttle(None)
    pulling.join(120)
    assert store.stub.GetModel(pb.GetModelRequest(model_id="test-tiny")).state == pb.READY

    recorded = [e for e in store.store.bus.history() if e.sequence > last]
    assert recorded and recorded[-1].state.value == "READY"
    resumed = Watch(store, after_sequence=last)
    watches.append(resumed)
    events = resumed.until(lambda e: e.type == pb.HEARTBEAT)[:-1]
    assert [e.sequence for e in events] == [e.sequence for e in recorded]
    assert [(e.model_id, pb.EventType.Name(e.type), STATE_NAMES[e.state], e.bytes_done) for e in events] == [
        (e.model_id, e.type.value, e.state.value, e.bytes_done) for e in recorded
    ]
    assert all(e.type not in (pb.SNAPSHOT, pb.SNAPSHOT_END) for e in events)


def test_client_too_far_behind_gets_a_resync_snapshot(
    start_store: Callable[..., StoreHandle], watches: list[Watch]
) -> None:
    handle = start_store(event_history=20)
    old = handle.store.bus.sequence
    while handle.store.bus.sequence - old <= 25:
        pull(handle, "test-text")
        handle.stub.DeleteModel(pb.DeleteModelRequest(model_id="test-text"))
    assert handle.store.bus.events_after(old) is None
    watch = Watch(handle, after_sequence=old)
    watches.append(watch)
    snapshot, end = read_snapshot(watch)
    assert len(snapshot) == len(handle.store.catalog.ids())
    assert all(e.type == pb.SNAPSHOT and e.resync and e.HasField("model") for e in snapshot)
    assert end.resync and end.sequence == handle.store.bus.sequence


def test_sequence_from_the_future_gets_a_resync_snapshot(store: StoreHandle, watches: list[Watch]) -> None:
    watch = Watch(store, after_sequence=store.store.bus.sequence + 1000)
    watches.append(watch)
    snapshot, end = read_snapshot(watch)
    assert sorted(e.model_id for e in snapshot) == store.store.catalog.ids()
    assert all(e.resync for e in snapshot) and end.resync


def test_model_filter_applies_to_snapshot_and_live_events(store: StoreHandle, watches: list[Watch]) -> None:
    watch = Watch(store, model_ids=("test-tiny",))
    watches.append(watch)
    snapshot, _ = read_snapshot(watch)
    assert [e.model_id for e in snapshot] == ["test-tiny"]
    pull(store, "test-text")
    store.stub.ImportModel(pb.ImportModelRequest(model_id="test-tiny", source_dir=str(TINY_EN_DIR)))
    live = watch.until(is_ready("test-tiny"))
    assert {e.model_id for e in live if e.type != pb.HEARTBEAT} == {"test-tiny"}


def test_progress_events_are_rate_limited_but_state_changes_all_arrive(
    store: StoreHandle, hub: HubServer, watches: list[Watch]
) -> None:
    watch = Watch(store, model_ids=("test-tiny",))
    watches.append(watch)
    read_snapshot(watch)
    hub.throttle(40 << 20, path="model.bin")  # ~1.9 s for model.bin: 75 one-MiB chunks arrive
    assert pull(store, "test-tiny")[-1].state == pb.READY
    events = [e for e in watch.until(is_ready("test-tiny")) if e.type != pb.HEARTBEAT]
    states = [e.state for e in events if e.type == pb.STATE_CHANGED]
    for state in (pb.WAITING, pb.DOWNLOADING, pb.VERIFYING, pb.READY):
        assert state in states, STATE_NAMES[state]
    progress = [e for e in events if e.type == pb.PROGRESS and e.current_file == "model.bin"]
    assert len(progress) >= 5
    times = [e.timestamp.ToNanoseconds() / 1e9 for e in progress]
    span = times[-1] - times[0]
    assert span > 0.5
    per_second = (len(progress) - 1) / span
    assert per_second <= 10 + 1.5, f"{len(progress)} PROGRESS events in {span:.2f} s"
    chunks = (events[-1].bytes_total or 1) >> 20
    assert len(progress) < chunks, "one PROGRESS event per chunk means no rate limit"


def test_fifty_watchers_all_see_ready_and_gauge_follows(store: StoreHandle, watches: list[Watch]) -> None:
    gauge = store.store.metrics.active_watchers.labels("WatchModels")
    opened = [Watch(store, model_ids=("test-text",)) for _ in range(50)]
    watches.extend(opened)
    for watch in opened:
        read_snapshot(watch)
    assert gauge._value.get() == 50
    pull(store, "test-text")
    for watch in opened:
        ready = watch.until(is_ready("test-text"))[-1]
        assert ready.bytes_total == ready.bytes_done > 0
    for watch in opened:
        watch.call.cancel()
    wait_for(lambda: gauge._value.get() == 0, message="active_watchers back to 0")
    assert store.app.servicer.open_streams == 0
    assert store.store.bus.listener_count <= 1  # one broadcast listener serves every stream


class _HoldJobEnd(logging.Handler):
    """Holds the download worker at its "model ready" log line: after READY is published,
    before the job is marked done, a moment in which no further event is published."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = threading.Event()
        self.proceed = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "model ready":
            self.reached.set()
            self.proceed.wait(30)


def test_pull_stream_ends_when_the_job_ends_not_at_the_next_heartbeat(start_store: Callable[..., StoreHandle]) -> None:
    handle = start_store(heartbeat_seconds=600)
    hold = _HoldJobEnd()
    store_logger = logging.getLogger("model_service.store")
    level = store_logger.level
    store_logger.setLevel(logging.INFO)
    store_logger.addHandler(hold)
    try:
        stream = handle.stub.PullModel(pb.PullModelRequest(model_id="test-text"), timeout=20)
        events = []
        for event in stream:
            events.append(event)
            if event.type == pb.STATE_CHANGED and event.state == pb.READY:
                break
        assert hold.reached.wait(10)  # READY is out; the job has not ended yet
        hold.proceed.set()
        events.extend(stream)  # without a wake-up at job end this waits for the 600 s heartbeat
    finally:
        hold.proceed.set()
        store_logger.removeHandler(hold)
        store_logger.setLevel(level)
    assert events[-1].state == pb.READY
    assert stream.code() == grpc.StatusCode.OK


def typed_watch(handle: StoreHandle, types: list[int], after_sequence: int = 0) -> Iterator[pb.ModelEvent]:
    return handle.stub.WatchModels(pb.WatchModelsRequest(after_sequence=after_sequence, types=types), timeout=120)


def test_types_filter_gets_every_event_of_those_types_in_order_and_resumes(
    store: StoreHandle, hub: HubServer, watches: list[Watch]
) -> None:
    everything = Watch(store)
    watches.append(everything)
    everything.until(lambda e: e.type == pb.SNAPSHOT_END)
    hub.throttle(8 << 20, path="model.bin")
    states_only = typed_watch(store, [pb.STATE_CHANGED])
    thread = threading.Thread(target=pull, args=(store, "test-tiny"), daemon=True)
    thread.start()
    first = next(states_only)  # no snapshot: the first thing is a live state change
    assert first.type == pb.STATE_CHANGED
    received = [first]
    for event in states_only if first.state != pb.DOWNLOADING else ():  # disconnect mid-pull
        received.append(event)
        if event.state == pb.DOWNLOADING:
            break
    states_only.cancel()  # type: ignore[attr-defined]
    assert received[-1].state == pb.DOWNLOADING  # the throttled model.bin keeps it downloading
    resumed = typed_watch(store, [pb.STATE_CHANGED, pb.HEARTBEAT], after_sequence=received[-1].sequence)
    for event in resumed:
        if event.type == pb.HEARTBEAT:
            continue
        received.append(event)
        if is_ready("test-tiny")(event):
            break
    resumed.cancel()  # type: ignore[attr-defined]
    thread.join(60)

    seen_by_all = everything.until(is_ready("test-tiny"))
    assert any(e.type == pb.PROGRESS for e in seen_by_all)  # there was something to filter out
    unfiltered = [e for e in seen_by_all if e.type == pb.STATE_CHANGED and e.sequence >= first.sequence]
    assert {e.type for e in received} == {pb.STATE_CHANGED}
    assert [e.sequence for e in received] == [e.sequence for e in unfiltered]  # all of them, in order, once


def test_unknown_event_type_is_invalid_argument(store: StoreHandle) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        next(typed_watch(store, [99]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "STATE_CHANGED" in caught.value.details()
