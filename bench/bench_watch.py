"""WatchModels fan-out: delay from an event's server timestamp to its receipt, with K watchers.

A model store runs in this process (model_service.__main__.start_app on a background
loop) and pulls tiny.en (78 MB) from the loopback hub, throttled (default 20 MB/s, so a
pull lasts ~4 s and publishes ~40 PROGRESS events at the store's 10/s limit). K
WatchModels watchers (K = 1, 50, 200, 500) run in ONE CHILD PROCESS as grpc.aio
clients in one asyncio loop, each on its own channel and TCP connection (separate
subchannel pools), like K separate clients on loopback.

Why a child process: the machine has 2 cores. With the watchers in the store's process,
their Python work (500 streams decoding events) would share the GIL with the store's
gRPC loop and the measurement would be of the clients starving the server.

For every PROGRESS event at every watcher: delay = receipt time (time.time() when the
aio client hands it over) - ModelEvent.timestamp (time.time() when the store created
it); same host, same clock. The delay includes the client's own queueing (one Python
process decoding K streams), so it is an upper bound of the server's part. Checked too:
every watcher received every event of the model the server published during the pulls
(state changes and progress), none missed, none twice.

    .venv/bin/python -m bench.bench_watch            # K = 1 50 200 500, 2 pulls each (~1.5 min)
    .venv/bin/python -m bench.bench_watch --quick    # K = 1 50, 1 pull each at 40 MB/s (< 30 s)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from bench import benchlib
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2_grpc as pb_grpc

PROGRESS, STATE_CHANGED = int(pb.PROGRESS), int(pb.STATE_CHANGED)


# --------------------------------------------------------------------------- child: the watchers


async def run_watchers(address: str, count: int, model_id: str, out: Path, shared_channel: bool) -> None:
    loop = asyncio.get_running_loop()
    options = [] if shared_channel else [("grpc.use_local_subchannel_pool", 1)]
    channels: list[grpc.aio.Channel] = []
    records: list[list[tuple[int, int, int, float, float]]] = [[] for _ in range(count)]
    snapshot_seq = [0] * count
    ready = asyncio.Event()
    ready_count = 0
    target: list[int] = []  # set from stdin: stop once every watcher has this sequence
    finished = asyncio.Event()
    done_count = 0
    reached = [False] * count

    async def watch(index: int, channel: grpc.aio.Channel) -> None:
        nonlocal ready_count, done_count
        stub = pb_grpc.ModelStoreStub(channel)
        call = stub.WatchModels(pb.WatchModelsRequest(model_ids=[model_id]))
        mine = records[index]
        async for event in call:
            received = time.time()
            kind = event.type
            if kind == pb.SNAPSHOT_END:
                snapshot_seq[index] = event.sequence
                ready_count += 1
                if ready_count == count:
                    ready.set()
                continue
            if kind == pb.SNAPSHOT or kind == pb.HEARTBEAT:
                continue
            mine.append(
                (event.sequence, kind, event.state, event.timestamp.seconds + event.timestamp.nanos / 1e9, received)
            )
            if target and not reached[index] and event.sequence >= target[0]:
                reached[index] = True
                done_count += 1
                if done_count == count:
                    finished.set()

    shared = grpc.aio.insecure_channel(address) if shared_channel else None
    tasks = []
    for index in range(count):
        channel = shared if shared is not None else grpc.aio.insecure_channel(address, options=options)
        if shared is None:
            channels.append(channel)
        tasks.append(asyncio.create_task(watch(index, channel)))
    await asyncio.wait_for(ready.wait(), 120)
    print(json.dumps({"ready": True, "snapshot_max": max(snapshot_seq)}), flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    target.append(int(json.loads(line)["target"]))
    for index, mine in enumerate(records):
        if not reached[index] and any(seq >= target[0] for seq, *_ in mine):
            reached[index] = True
            done_count += 1
    timed_out = False
    if done_count < count:
        try:
            await asyncio.wait_for(finished.wait(), 60)
        except TimeoutError:
            timed_out = True
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    if shared is not None:
        await shared.close()
    out.write_text(
        json.dumps(
            {
                "snapshot_seq": snapshot_seq,
                "records": records,
                "timed_out": timed_out,
                "cpu_seconds": time.process_time(),
            }
        )
    )
    print(json.dumps({"dumped": True}), flush=True)


# --------------------------------------------------------------------------- parent


def pull_once(stub: pb_grpc.ModelStoreStub, model_id: str) -> float:
    view = stub.GetModel(pb.GetModelRequest(model_id=model_id))
    if view.state != pb.NOT_DOWNLOADED:
        stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id))
    started = time.perf_counter()
    last = None
    for event in stub.PullModel(pb.PullModelRequest(model_id=model_id), timeout=600):
        last = event
        if event.type == pb.STATE_CHANGED and event.state == pb.READY:
            break  # the READY event is what the bench waits for (see bench_pull for the stream's end)
    if last is None or last.state != pb.READY:
        raise RuntimeError(f"pull ended without READY: {last}")
    return time.perf_counter() - started


def measure_k(
    store: benchlib.InProcessStore, stub: pb_grpc.ModelStoreStub, k: int, reps: int, work: Path, shared_channel: bool
) -> dict[str, Any]:
    out = work / f"watchers-{k}.json"
    command = [
        sys.executable,
        "-m",
        "bench.bench_watch",
        "--child",
        "--address",
        store.address,
        "--watchers",
        str(k),
        "--out",
        str(out),
    ]
    if shared_channel:
        command.append("--shared-channel")
    started_connect = time.perf_counter()
    child = subprocess.Popen(command, cwd=benchlib.REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        line = child.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"watcher process failed to start (exit {child.poll()})")
        connect_seconds = time.perf_counter() - started_connect
        bus = store.store.bus
        start_seq = bus.sequence
        cpu_before = time.process_time()
        child_cpu_before = benchlib.process_cpu_seconds(child.pid)
        pulls = [pull_once(stub, benchlib.TINY_MODEL_ID) for _ in range(reps)]
        server_cpu = time.process_time() - cpu_before
        child_cpu = benchlib.process_cpu_seconds(child.pid) - child_cpu_before
        expected = [e for e in bus.history() if e.model_id == benchlib.TINY_MODEL_ID and e.sequence > start_seq]
        target = expected[-1].sequence
        child.stdin.write(json.dumps({"target": target}) + "\n")
        child.stdin.flush()
        line = child.stdout.readline()
        child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    data = json.loads(out.read_text())
    out.unlink()

    expected_all = {e.sequence for e in expected}
    expected_state = [e.sequence for e in expected if e.type.value == "STATE_CHANGED"]
    expected_progress = {e.sequence for e in expected if e.type.value == "PROGRESS"}
    delays: list[float] = []
    state_delays: list[float] = []
    per_event_worst: dict[int, float] = {}
    missed_events = missed_state = duplicates = out_of_order = watchers_missing_state = 0
    progress_counts: list[int] = []
    for records in data["records"]:
        seqs = [r[0] for r in records if r[0] > start_seq]
        received = set(seqs)
        duplicates += len(seqs) - len(received)
        out_of_order += sum(1 for a, b in itertools.pairwise(seqs) if b <= a)
        missed_events += len(expected_all - received)
        missing_state = [s for s in expected_state if s not in received]
        missed_state += len(missing_state)
        watchers_missing_state += bool(missing_state)
        count = 0
        for seq, kind, _state, server_ts, received_ts in records:
            if seq <= start_seq:
                continue
            delay = received_ts - server_ts
            if kind == PROGRESS:
                count += 1
                delays.append(delay)
                per_event_worst[seq] = max(per_event_worst.get(seq, 0.0), delay)
            elif kind == STATE_CHANGED:
                state_delays.append(delay)
        progress_counts.append(count)
    summary = benchlib.summarize(delays)
    return {
        "watchers": k,
        "pulls": reps,
        "connect_seconds": connect_seconds,
        "pull_seconds": benchlib.summarize(pulls),
        "progress_events_published": len(expected_progress),
        "state_changes_published": len(expected_state),
        "progress_events_per_watcher": benchlib.summarize(progress_counts),
        "progress_delay_seconds": {key: summary.get(key) for key in ("n", "median", "p90", "max")}
        | {"p50": benchlib.percentile(delays, 50), "p99": benchlib.percentile(delays, 99)},
        "slowest_watcher_delay_per_event_seconds": {
            "p50": benchlib.percentile(list(per_event_worst.values()), 50),
            "p99": benchlib.percentile(list(per_event_worst.values()), 99),
        },
        "state_change_delay_seconds": {
            "p50": benchlib.percentile(state_delays, 50),
            "p99": benchlib.percentile(state_delays, 99),
        },
        "missed_events": missed_events,
        "missed_state_changes": missed_state,
        "watchers_missing_a_state_change": watchers_missing_state,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "child_timed_out": data["timed_out"],
        "store_process_cpu_seconds": server_cpu,
        "watcher_process_cpu_seconds": child_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watchers", type=int, nargs="+", default=[1, 50, 200, 500], help="K values")
    parser.add_argument("--pulls", type=int, default=2, help="pulls per K")
    parser.add_argument("--rate-mb", type=float, default=20.0, help="hub throttle, MB/s")
    parser.add_argument("--quick", action="store_true", help="smoke run: K = 1 50, 1 pull each, 40 MB/s")
    parser.add_argument(
        "--shared-channel", action="store_true", help="all watchers on one channel (one HTTP/2 connection)"
    )
    benchlib.add_run_options(parser, "bench_watch")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(run_watchers(args.address, args.watchers[0], benchlib.TINY_MODEL_ID, args.out, args.shared_channel))
        return
    if args.quick:
        args.watchers, args.pulls, args.rate_mb = [1, 50], 1, 40.0
    quiet, audit = benchlib.start_run(args, "bench_watch")

    from tests.support import LoopThread

    loop_thread = LoopThread()
    hub = benchlib.start_hub("process", int(args.rate_mb * 1e6))
    results: list[dict[str, Any]] = []
    with benchlib.temp_dir("watch") as work:
        store = benchlib.start_store_inprocess(loop_thread, work / "store", hub.endpoint)
        channel = grpc.insecure_channel(store.address)
        stub = pb_grpc.ModelStoreStub(channel)
        try:
            warm = pull_once(stub, benchlib.TINY_MODEL_ID)
            print(f"warm-up pull: {warm:.2f} s", flush=True)
            for k in args.watchers:
                result = measure_k(store, stub, k, args.pulls, work, args.shared_channel)
                results.append(result)
                d = result["progress_delay_seconds"]
                print(
                    f"K={k}: progress delay p50 {d['p50'] * 1000:.1f} ms p99 {d['p99'] * 1000:.1f} ms, "
                    f"missed {result['missed_events']}, pull {result['pull_seconds']['median']:.2f} s",
                    flush=True,
                )
        finally:
            channel.close()
            store.stop()
            hub.stop()
            loop_thread.close()

    rows = []
    for r in results:
        d, worst, per = (
            r["progress_delay_seconds"],
            r["slowest_watcher_delay_per_event_seconds"],
            r["progress_events_per_watcher"],
        )
        rows.append(
            [
                r["watchers"],
                f"{d['p50'] * 1000:.1f}",
                f"{d['p99'] * 1000:.1f}",
                f"{worst['p99'] * 1000:.1f}",
                f"{r['state_change_delay_seconds']['p99'] * 1000:.1f}",
                f"{per['min']:.0f}/{per['max']:.0f} of {r['progress_events_published']}",
                f"{r['missed_events']}/{r['missed_state_changes']}",
                f"{r['pull_seconds']['median']:.2f}",
                f"{r['store_process_cpu_seconds']:.2f}/{r['watcher_process_cpu_seconds']:.2f}",
            ]
        )
    benchlib.print_table(
        f"WatchModels with K watchers during {args.pulls} throttled pull(s) of {args.rate_mb:g} MB/s "
        "(delays in ms; watchers in a child process)",
        [
            "K",
            "p50",
            "p99",
            "p99 slowest",
            "state p99",
            "PROGRESS/watcher min/max",
            "missed ev/state",
            "pull s",
            "CPU s store/watchers",
        ],
        rows,
    )
    benchlib.write_result(
        args.name,
        benchlib.rounded(
            {
                "settings": {
                    "watchers": args.watchers,
                    "pulls_per_k": args.pulls,
                    "rate_mb_per_s": args.rate_mb,
                    "shared_channel": args.shared_channel,
                    "progress_events_per_second_limit": 10.0,
                    "watchers_in": "child process, grpc.aio, one asyncio loop",
                },
                "results": results,
                "all_state_changes_received": all(r["missed_state_changes"] == 0 for r in results),
                "all_events_received": all(r["missed_events"] == 0 and r["duplicates"] == 0 for r in results),
            }
        ),
        audit,
        quiet,
    )


if __name__ == "__main__":
    main()
