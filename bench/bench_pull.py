"""Pull throughput: PullModel through the model store vs huggingface_hub.snapshot_download, same run.

A loopback hub (tests.hubserver) serves the real tiny.en files (75.5 MB model.bin and
three small files). Each round times, in alternating order:

  raw         huggingface_hub.snapshot_download(repo, endpoint=hub, cache_dir=<fresh>, allow_patterns=<catalog>)
  raw+sha256  the same download plus a sha256 pass over the downloaded files afterwards
              (what it takes to get the guarantee the store gives; a fairer baseline)
  GET+sha256+fsync  each file fetched once with huggingface_hub's HTTP client, hashed while
              written, fsynced: the least work that gives the store's guarantees
  store       PullModel over gRPC to a model store running in this process (DeleteModel
              before, untimed), from the call until the stream ends with READY; the store
              hashes while writing, fsyncs and moves verified files into place

and reports MB/s (10^6 bytes per second) of each and the ratios store/raw and
store/(raw+sha256) (goal >= 0.95). The legs rotate their order every round. The hub's
sockets run with TCP_NODELAY (see benchlib.configure_hub_sockets; --hub-nagle to keep
the test server's random 40 ms delayed-ACK stalls).

    .venv/bin/python -m bench.bench_pull            # 10 rounds after 1 warm-up (~25 s)
    .venv/bin/python -m bench.bench_pull --quick    # 2 rounds (< 20 s)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
from huggingface_hub import snapshot_download

from bench import benchlib
from model_service.catalog import WHISPER_FILES
from tests.support import LoopThread, sha256, tiny_en_files
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2_grpc as pb_grpc

MB = 1_000_000


def sha256_files(paths: list[Path]) -> None:
    for path in paths:
        sha256(path)


def raw_download(endpoint: str, cache_dir: Path) -> tuple[float, float, int]:
    """(download seconds, sha256 pass seconds, bytes) of one snapshot_download."""
    started = time.perf_counter()
    folder = snapshot_download(
        benchlib.TINY_REPO,
        endpoint=endpoint,
        cache_dir=cache_dir,
        allow_patterns=list(WHISPER_FILES),
    )
    downloaded = time.perf_counter()
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    sha256_files(files)
    hashed = time.perf_counter()
    size = sum(p.stat().st_size for p in files)
    return downloaded - started, hashed - downloaded, size


def minimal_download(endpoint: str, dest: Path) -> float:
    """Seconds to GET each file once with huggingface_hub's HTTP client, writing it while
    hashing it with sha256 and fsyncing it: the least work that gives the store's
    guarantees (every byte verified, files durable), without any bookkeeping."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_session

    dest.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name in sorted(tiny_en_files()):
        digest = hashlib.sha256()
        with get_session().stream("GET", hf_hub_url(benchlib.TINY_REPO, name, endpoint=endpoint)) as response:
            response.raise_for_status()
            with open(dest / name, "wb") as handle:
                for block in response.iter_bytes():
                    handle.write(block)
                    digest.update(block)
                handle.flush()
                os.fsync(handle.fileno())
        digest.hexdigest()
    return time.perf_counter() - started


def store_pull(stub: pb_grpc.ModelStoreStub) -> tuple[float, float, dict[str, float], int]:
    """(seconds to the stream's end, seconds to the READY event, phase seconds from the
    events' server timestamps, bytes) of one PullModel."""
    started_wall = time.time()
    started = time.perf_counter()
    last = None
    ready_at = float("nan")
    marks: dict[str, float] = {}
    for event in stub.PullModel(pb.PullModelRequest(model_id=benchlib.TINY_MODEL_ID), timeout=300):
        last = event
        if event.type == pb.STATE_CHANGED and event.state == pb.READY:
            ready_at = time.perf_counter() - started
        if event.type == pb.STATE_CHANGED:
            name = pb.ModelState.Name(event.state)
            if name == "DOWNLOADING" and event.message.startswith("downloading"):
                marks["manifest"] = event.timestamp.ToNanoseconds() / 1e9
            marks.setdefault(name, event.timestamp.ToNanoseconds() / 1e9)
    elapsed = time.perf_counter() - started
    if last is None or last.state != pb.READY:
        raise RuntimeError(f"PullModel ended without READY: {last}")
    phases = {}
    if "manifest" in marks:
        phases["call_to_manifest"] = marks["manifest"] - started_wall
        if "VERIFYING" in marks:
            phases["transfer"] = marks["VERIFYING"] - marks["manifest"]
    if "VERIFYING" in marks and "READY" in marks:
        phases["verify_to_ready"] = marks["READY"] - marks["VERIFYING"]
    return elapsed, ready_at, phases, int(last.bytes_total)


def diagnostics(work: Path) -> dict[str, float]:
    """Costs the store pays that a plain download does not, on this machine, for model.bin."""
    source = tiny_en_files()["model.bin"]
    data = source.read_bytes()
    out: dict[str, float] = {}

    def timed(fn: Any, repeat: int = 3) -> float:
        best = []
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            best.append(time.perf_counter() - started)
        return statistics.median(best)

    view = memoryview(data)
    step = 1 << 20

    def sha256_only() -> None:
        digest = hashlib.sha256()
        for i in range(0, len(view), step):
            digest.update(view[i : i + step])

    def sha256_and_sha1() -> None:
        a, b = hashlib.sha256(), hashlib.sha1(usedforsecurity=False)
        for i in range(0, len(view), step):
            a.update(view[i : i + step])
            b.update(view[i : i + step])

    target = work / "fsync-probe.bin"

    def write_plain() -> None:
        with open(target, "wb") as handle:
            for i in range(0, len(view), step):
                handle.write(view[i : i + step])
        target.unlink()

    def write_fsync() -> None:
        with open(target, "wb") as handle:
            for i in range(0, len(view), step):
                handle.write(view[i : i + step])
            handle.flush()
            os.fsync(handle.fileno())
        target.unlink()

    out["model_bin_bytes"] = len(data)
    out["sha256_s"] = timed(sha256_only)
    out["sha256_plus_git_sha1_s"] = timed(sha256_and_sha1)
    benchlib.drop_dirty_pages()
    out["write_s"] = timed(write_plain)
    benchlib.drop_dirty_pages()
    out["write_fsync_s"] = timed(write_fsync)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds", type=int, default=10, help="measured rounds (each: raw and store, alternating order)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 warm-up")
    parser.add_argument(
        "--hub-nagle",
        action="store_true",
        help="leave Nagle's algorithm on in the test hub (random 40 ms stalls on small answers; see benchlib.configure_hub_sockets)",
    )
    parser.add_argument(
        "--hub-mode",
        choices=("process", "inprocess"),
        default="process",
        help="hub in a child process (default) or on threads of this process",
    )
    benchlib.add_run_options(parser, "bench_pull")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup = 2, 1
    quiet, audit = benchlib.start_run(args, "bench_pull")

    loop_thread = LoopThread()
    hub = benchlib.start_hub(args.hub_mode, nodelay=not args.hub_nagle)
    samples: dict[str, list[float]] = {
        "raw": [],
        "raw_sha256": [],
        "minimal": [],
        "store": [],
        "store_ready_event": [],
        "sha256_pass": [],
    }
    phases: dict[str, list[float]] = {}
    sizes: set[int] = set()
    with benchlib.temp_dir("pull") as work:
        store = benchlib.start_store_inprocess(loop_thread, work / "store", hub.endpoint)
        channel = grpc.insecure_channel(store.address)
        stub = pb_grpc.ModelStoreStub(channel)
        try:
            total_rounds = args.warmup + args.rounds
            for round_index in range(total_rounds):
                measured = round_index >= args.warmup
                legs = ["raw", "minimal", "store"]
                shift = round_index % len(legs)
                for leg in legs[shift:] + legs[:shift]:  # each leg takes each place in turn
                    if leg == "minimal":
                        target = work / f"minimal-{round_index}"
                        benchlib.drop_dirty_pages()
                        seconds = minimal_download(hub.endpoint, target)
                        shutil.rmtree(target, ignore_errors=True)
                        if measured:
                            samples["minimal"].append(seconds)
                    elif leg == "raw":
                        cache_dir = work / f"raw-{round_index}"
                        benchlib.drop_dirty_pages()
                        seconds, hash_seconds, size = raw_download(hub.endpoint, cache_dir)
                        shutil.rmtree(cache_dir, ignore_errors=True)
                        if measured:
                            samples["raw"].append(seconds)
                            samples["sha256_pass"].append(hash_seconds)
                            samples["raw_sha256"].append(seconds + hash_seconds)
                            sizes.add(size)
                    else:
                        view = stub.GetModel(pb.GetModelRequest(model_id=benchlib.TINY_MODEL_ID))
                        if view.state != pb.NOT_DOWNLOADED:
                            stub.DeleteModel(pb.DeleteModelRequest(model_id=benchlib.TINY_MODEL_ID))
                        benchlib.drop_dirty_pages()
                        seconds, ready_seconds, phase, size = store_pull(stub)
                        if measured:
                            samples["store"].append(seconds)
                            samples["store_ready_event"].append(ready_seconds)
                            for key, value in phase.items():
                                phases.setdefault(key, []).append(value)
                            sizes.add(size)
                label = "warm-up" if not measured else f"round {round_index - args.warmup + 1}/{args.rounds}"
                if measured:
                    print(
                        f"{label}: raw {samples['raw'][-1]:.3f} s, GET+sha256+fsync {samples['minimal'][-1]:.3f} s, store {samples['store'][-1]:.3f} s "
                        f"(READY event after {samples['store_ready_event'][-1]:.3f} s)",
                        flush=True,
                    )
            diag = diagnostics(work)
        finally:
            channel.close()
            store.stop()
            hub.stop()
            loop_thread.close()

    if len(sizes) != 1:
        raise RuntimeError(f"raw and store moved different byte counts: {sizes}")
    nbytes = sizes.pop()
    summaries = {leg: benchlib.summarize(values) for leg, values in samples.items()}
    throughput = {
        leg: nbytes / MB / summaries[leg]["median"]
        for leg in ("raw", "raw_sha256", "minimal", "store", "store_ready_event")
    }
    per_round_ratio = [r / s for r, s in zip(samples["raw"], samples["store"], strict=True)]
    per_round_ratio_hashed = [r / s for r, s in zip(samples["raw_sha256"], samples["store"], strict=True)]
    ratio = throughput["store"] / throughput["raw"]
    ratio_hashed = throughput["store"] / throughput["raw_sha256"]
    rows = [
        [
            "raw snapshot_download",
            benchlib.fmt_spread(summaries["raw"], 1, " s"),
            f"{throughput['raw']:.0f}",
            "1.00",
        ],
        [
            "raw + sha256 pass",
            benchlib.fmt_spread(summaries["raw_sha256"], 1, " s"),
            f"{throughput['raw_sha256']:.0f}",
            f"{throughput['raw_sha256'] / throughput['raw']:.2f}",
        ],
        [
            "plain GET + sha256 + fsync",
            benchlib.fmt_spread(summaries["minimal"], 1, " s"),
            f"{throughput['minimal']:.0f}",
            f"{throughput['minimal'] / throughput['raw']:.2f}",
        ],
        [
            "store PullModel (gRPC)",
            benchlib.fmt_spread(summaries["store"], 1, " s"),
            f"{throughput['store']:.0f}",
            f"{ratio:.2f}",
        ],
        [
            "  ... until its READY event",
            benchlib.fmt_spread(summaries["store_ready_event"], 1, " s"),
            f"{throughput['store_ready_event']:.0f}",
            f"{throughput['store_ready_event'] / throughput['raw']:.2f}",
        ],
    ]
    benchlib.print_table(
        f"Pull of tiny.en ({nbytes / MB:.1f} MB, {args.rounds} rounds, median (min-max); hub in {args.hub_mode})",
        ["leg", "seconds", "MB/s", "x raw"],
        rows,
    )
    print(
        f"store / raw          = {ratio:.3f}  (per round: {', '.join(f'{r:.2f}' for r in per_round_ratio)})  goal >= 0.95"
    )
    print(
        f"store / (raw+sha256) = {ratio_hashed:.3f}  (per round: {', '.join(f'{r:.2f}' for r in per_round_ratio_hashed)})  goal >= 0.95"
    )
    print(
        f"store / (GET+sha256+fsync) = {throughput['store'] / throughput['minimal']:.3f}  (the least work with the store's guarantees)"
    )
    tails = [end - ready for end, ready in zip(samples["store"], samples["store_ready_event"], strict=True)]
    worst_tail = max(tails)
    print(
        f"PullModel stream end after its READY event: median {statistics.median(tails) * 1000:.1f} ms, max {worst_tail * 1000:.1f} ms"
    )
    if worst_tail > 0.5:
        print(
            "  !! a PullModel stream stayed open long after READY: its end waits for a wake-up that never comes (heartbeat timeout)"
        )
    phase_summary = {key: benchlib.summarize(values) for key, values in phases.items()}
    if phase_summary:
        print(
            "store phases (median, from server event timestamps): "
            + ", ".join(f"{k} {v['median'] * 1000:.0f} ms" for k, v in phase_summary.items())
        )
    print(
        "costs on this machine for model.bin: "
        f"sha256 {diag['sha256_s'] * 1000:.0f} ms, sha256+git sha1 {diag['sha256_plus_git_sha1_s'] * 1000:.0f} ms, "
        f"write {diag['write_s'] * 1000:.0f} ms, write+fsync {diag['write_fsync_s'] * 1000:.0f} ms"
    )
    benchlib.write_result(
        args.name,
        benchlib.rounded(
            {
                "settings": {
                    "rounds": args.rounds,
                    "warmup": args.warmup,
                    "hub_mode": args.hub_mode,
                    "hub_tcp_nodelay": not args.hub_nagle,
                    "bytes": nbytes,
                    "allow_patterns": list(WHISPER_FILES),
                },
                "seconds": summaries,
                "mb_per_s": throughput,
                "ratio_store_over_raw": ratio,
                "ratio_store_over_raw_sha256": ratio_hashed,
                "ratio_store_ready_event_over_raw": throughput["store_ready_event"] / throughput["raw"],
                "ratio_store_over_get_sha256_fsync": throughput["store"] / throughput["minimal"],
                "per_round_ratio_store_over_raw": per_round_ratio,
                "store_phases_seconds": phase_summary,
                "stream_end_after_ready_event_seconds": benchlib.summarize(tails),
                "diagnostics_seconds": diag,
                "goal": "store/raw >= 0.95",
                "goal_met": ratio >= 0.95,
                "goal_met_vs_raw_sha256": ratio_hashed >= 0.95,
            }
        ),
        audit,
        quiet,
    )


if __name__ == "__main__":
    main()
