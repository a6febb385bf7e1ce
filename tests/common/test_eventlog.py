"""EventLog: sequences, bounded history, follow() with resync, heartbeat, filter, end and wake-ups."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from voxserve_common.eventlog import End, EventLog, Followed, Heartbeat, Resync

HANG_GUARD = 60.0  # seconds; only there so that a bug fails the test instead of hanging it

R = TypeVar("R")


@dataclass(frozen=True)
class Item:
    sequence: int
    value: str


def run(test: Callable[[], Awaitable[R]]) -> R:
    async def guarded() -> R:
        return await asyncio.wait_for(test(), HANG_GUARD)

    return asyncio.run(guarded())


def append(log: EventLog[Item], value: str) -> Item:
    return log.append(lambda sequence: Item(sequence, value))


def filled(count: int, history: int = 100, first_sequence: int = 0) -> EventLog[Item]:
    log: EventLog[Item] = EventLog(history, first_sequence)
    for n in range(count):
        append(log, f"e{n + 1}")
    return log


async def collect(log: EventLog[Item], after: int, **options: Any) -> list[Followed[Item]]:
    """Every item of a follow up to its End (the log must be closed or a stop set)."""
    return [item async for item in log.follow(after, **options)]


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


def test_append_stamps_consecutive_sequences_from_first_sequence() -> None:
    log = filled(3, first_sequence=1000)
    assert [e.sequence for e in log.history()] == [1001, 1002, 1003]
    assert log.sequence == 1003
    assert [e.value for e in log.history()] == ["e1", "e2", "e3"]


def test_events_after_serves_the_history_and_none_outside_it() -> None:
    log = filled(10, history=4)
    assert [e.sequence for e in log.events_after(7) or []] == [8, 9, 10]
    assert [e.sequence for e in log.events_after(6) or []] == [7, 8, 9, 10]
    assert log.events_after(10) == []
    assert log.events_after(5) is None  # event 6 left the history
    assert log.events_after(11) is None  # from the future: another incarnation
    assert filled(0).events_after(0) == []


def test_follow_resumes_after_n_and_ends_when_the_log_is_closed() -> None:
    log = filled(5)
    log.close()
    items = run(lambda: collect(log, 2))
    assert items == [Item(3, "e3"), Item(4, "e4"), Item(5, "e5"), End(5, closed=True)]
    assert run(lambda: collect(log, 5)) == [End(5, closed=True)]


def test_append_after_close_is_refused() -> None:
    log = filled(1)
    log.close()
    log.close()  # closing twice is harmless
    with pytest.raises(RuntimeError):
        append(log, "late")
    assert log.sequence == 1 and log.closed


def test_live_events_then_end_when_closed_from_another_thread() -> None:
    log = filled(1)

    async def follow() -> list[Followed[Item]]:
        items: list[Followed[Item]] = []
        async for item in log.follow(0):
            items.append(item)
            if item == Item(1, "e1"):
                threading.Thread(target=lambda: (append(log, "e2"), append(log, "e3"), log.close())).start()
        return items

    assert run(follow) == [Item(1, "e1"), Item(2, "e2"), Item(3, "e3"), End(3, closed=True)]


def test_fallen_out_of_history_resyncs_then_resumes_where_the_follower_says() -> None:
    log = filled(10, history=3)

    async def follow() -> list[Followed[Item]]:
        items: list[Followed[Item]] = []
        async for item in log.follow(2):
            items.append(item)
            if isinstance(item, Resync):
                item.resume_after(8)  # the follower's snapshot showed the state at 8
                log.close()
        return items

    items = run(follow)
    assert items[0] == Resync(after=2, sequence=10) and not items[0].from_the_future
    assert items[1:] == [Item(9, "e9"), Item(10, "e10"), End(10, closed=True)]


def test_resync_resumes_after_the_log_sequence_by_default() -> None:
    log = filled(10, history=3)
    log.close()
    items = run(lambda: collect(log, 1))
    assert items == [Resync(after=1, sequence=10), End(10, closed=True)]


def test_sequence_from_the_future_resyncs() -> None:
    log = filled(5)

    async def follow() -> list[Followed[Item]]:
        items: list[Followed[Item]] = []
        async for item in log.follow(100):
            items.append(item)
            if isinstance(item, Resync):
                append(log, "e6")
                log.close()
        return items

    items = run(follow)
    assert isinstance(items[0], Resync) and items[0].from_the_future
    assert (items[0].after, items[0].sequence) == (100, 5)
    assert items[1:] == [Item(6, "e6"), End(6, closed=True)]


def test_filtered_follower_still_advances_its_resume_point() -> None:
    log = filled(0)
    for value in ["a", "b", "a", "b", "b"]:
        append(log, value)
    log.close()
    items = run(lambda: collect(log, 0, filter=lambda e: e.value == "a"))
    assert items == [Item(1, "a"), Item(3, "a"), End(5, closed=True)]


def test_heartbeat_when_nothing_passes_for_a_while_carries_the_resume_point() -> None:
    log = filled(3)  # none of them passes the filter

    async def follow() -> list[Followed[Item]]:
        items: list[Followed[Item]] = []
        async for item in log.follow(0, filter=lambda e: e.value == "wanted", heartbeat=0.01):
            items.append(item)
            if len(items) == 2:
                append(log, "wanted")
            if isinstance(item, Item):
                log.close()
        return items

    items = run(follow)
    assert items == [Heartbeat(3), Heartbeat(3), Item(4, "wanted"), End(4, closed=True)]


def test_no_heartbeat_without_a_heartbeat_interval() -> None:
    log = filled(1)

    async def follow() -> list[Followed[Item]]:
        items: list[Followed[Item]] = []
        async for item in log.follow(0):
            items.append(item)
            if isinstance(item, Item):
                await asyncio.sleep(0.05)  # a gap in which a heartbeat could come
                log.close()
        return items

    assert run(follow) == [Item(1, "e1"), End(1, closed=True)]


def test_stop_event_ends_the_follow_after_the_events_before_it() -> None:
    log = filled(2)

    async def follow() -> list[Followed[Item]]:
        stop = asyncio.Event()
        items: list[Followed[Item]] = []
        async for item in log.follow(0, stop=(asyncio.Event(), stop)):
            items.append(item)
            if item == Item(2, "e2"):
                append(log, "e3")
                stop.set()
        return items

    assert run(follow) == [Item(1, "e1"), Item(2, "e2"), Item(3, "e3"), End(3, closed=False)]
    assert not log.closed


def test_stop_wakes_an_idle_follower() -> None:
    log = filled(0)

    async def scenario() -> list[Followed[Item]]:
        stop = asyncio.Event()
        follower = asyncio.ensure_future(collect(log, 0, stop=(stop,)))
        await wait_until(lambda: log.follower_count == 1)
        await asyncio.sleep(0)
        stop.set()
        return await follower

    assert run(scenario) == [End(0, closed=False)]
    assert log.follower_count == 0


def test_closing_the_generator_stops_following() -> None:
    log = filled(3)

    async def scenario() -> None:
        items = log.follow(0, stop=(asyncio.Event(),))
        async with contextlib.aclosing(items):
            async for item in items:
                assert log.follower_count == 1 and log.loop_count == 1
                if item == Item(2, "e2"):
                    break
        assert log.follower_count == 0 and log.loop_count == 0

    run(scenario)
    append(log, "e4")  # nobody to wake: no loop is touched


def test_many_followers_are_woken_by_one_loop_hop_per_burst() -> None:
    log = filled(0)
    followers, burst = 50, 100
    received: list[list[int]] = [[] for _ in range(followers)]

    async def follower(index: int, stop: asyncio.Event) -> Followed[Item]:
        async for item in log.follow(0, stop=(stop,)):
            if isinstance(item, Item):
                received[index].append(item.sequence)
            else:
                return item
        raise AssertionError("follow ended without End")

    async def scenario() -> list[Followed[Item]]:
        loop = asyncio.get_running_loop()
        hops: list[object] = []
        threadsafe = loop.call_soon_threadsafe

        def counting(callback: Callable[..., object], *args: Any, **kwargs: Any) -> asyncio.Handle:
            hops.append(callback)
            return threadsafe(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(follower(i, stop)) for i in range(followers)]
        await wait_until(lambda: log.follower_count == followers)
        assert log.loop_count == 1
        publisher = threading.Thread(target=lambda: [append(log, f"e{n}") for n in range(burst)])
        publisher.start()
        publisher.join()  # blocks the loop: the whole burst lands before any wake-up runs
        await wait_until(lambda: all(len(seen) == burst for seen in received))
        assert len(hops) == 1  # one hop woke all 50 followers for 100 events
        append(log, "after the burst")
        await wait_until(lambda: all(len(seen) == burst + 1 for seen in received))
        assert len(hops) == 2
        stop.set()
        return await asyncio.gather(*tasks)

    ends = run(scenario)
    assert ends == [End(burst + 1, closed=False)] * followers
    assert received == [list(range(1, burst + 2))] * followers
    assert log.follower_count == 0 and log.loop_count == 0


def test_followers_on_two_loops_are_each_woken() -> None:
    log = filled(0)
    registered = threading.Barrier(3)
    results: dict[str, list[Followed[Item]]] = {}

    def follower(name: str) -> None:
        async def scenario() -> list[Followed[Item]]:
            task = asyncio.ensure_future(collect(log, 0))
            await wait_until(lambda: log.loop_count == 2)  # both loops have their follower
            registered.wait(HANG_GUARD)
            return await task

        results[name] = run(scenario)

    threads = [threading.Thread(target=follower, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    registered.wait(HANG_GUARD)
    append(log, "x")
    log.close()
    for thread in threads:
        thread.join(HANG_GUARD)
    assert results == {"a": [Item(1, "x"), End(1, closed=True)], "b": [Item(1, "x"), End(1, closed=True)]}


def test_publishing_from_threads_while_following_gives_every_event_once_in_order() -> None:
    log: EventLog[Item] = EventLog(100_000)
    writers, per_writer = 4, 500
    total = writers * per_writer

    def publish(writer: int) -> None:
        for n in range(per_writer):
            append(log, f"{writer}:{n}")

    async def scenario() -> tuple[list[Followed[Item]], list[Followed[Item]]]:
        everything = asyncio.ensure_future(collect(log, 0))
        only_first = asyncio.ensure_future(collect(log, 0, filter=lambda e: e.value.startswith("0:")))
        await wait_until(lambda: log.follower_count == 2)
        threads = [threading.Thread(target=publish, args=(w,)) for w in range(writers)]
        for thread in threads:
            thread.start()
        await asyncio.to_thread(lambda: [thread.join() for thread in threads])
        log.close()
        return await everything, await only_first

    everything, only_first = run(scenario)
    events = [item for item in everything if isinstance(item, Item)]
    assert [e.sequence for e in events] == list(range(1, total + 1))
    for writer in range(writers):
        mine = [int(e.value.split(":")[1]) for e in events if e.value.startswith(f"{writer}:")]
        assert mine == list(range(per_writer))
    assert everything[-1] == End(total, closed=True)
    assert [e.value for e in only_first if isinstance(e, Item)] == [f"0:{n}" for n in range(per_writer)]
    assert only_first[-1] == End(total, closed=True)


def test_a_slow_follower_that_falls_behind_resyncs_instead_of_blocking_publishers() -> None:
    log: EventLog[Item] = EventLog(5)

    async def scenario() -> list[Followed[Item]]:
        items: list[Followed[Item]] = []
        async for item in log.follow(0):
            items.append(item)
            if len(items) == 1:
                for n in range(20):  # appended while this follower is busy with item 1
                    append(log, f"late{n}")
                log.close()
        return items

    append(log, "first")
    items = run(scenario)
    assert items == [Item(1, "first"), Resync(after=1, sequence=21), End(21, closed=True)]
