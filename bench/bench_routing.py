"""Routing by model vs round robin, through the same HAProxy (deploy/haproxy/haproxy.cfg) in front of the
same inference replicas: model loads per 100 calls, cache hit ratio after the warm-up, latency p50/p95.

One model store (in this process), 3 inference replicas (real processes, a cache of 2 models each,
warm-up on as deployed, one CPU thread each), 6 model ids (the same tiny.en files under 6 names), mutual
TLS on both sides. Two HAProxy processes run the deployed file: one as is (consistent hashing on
x-voxserve-model, bounded load), one with the by-model backend balanced round robin. Each round, for
each (alternating which goes first): every replica's cache emptied, one call per model (the warm-up),
then the same Zipf-like sequence of Transcribe calls (speech_short.wav, beam 1) from --clients
threads. Loads and hits come from each replica's GetCacheStats; latency is the client's, per call.

    .venv/bin/python -m bench.bench_routing               # 2 rounds x 150 calls per mode, ~12 min on 2 cores
    .venv/bin/python -m bench.bench_routing --quick       # 1 round x 40 calls, ~3 min
    .venv/bin/python -m bench.bench_routing --clients 2   # two calls in flight: the bounded load at work
    .venv/bin/python -m bench.bench_routing --clients 2 --balance-factor 300   # ... and without it
"""

from __future__ import annotations

import argparse
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import benchlib
from model_service.config import ModelStoreConfig
from tests.proxies import HAProxyProcess, haproxy_config
from tests.replicas import (
    MODELS,
    CallResult,
    Replica,
    cache_counts,
    client_tls,
    make_secrets,
    routing_catalog,
    start_replicas,
    total,
    transcribe_routed,
    zipf_models,
)
from tests.support import DATA_DIR, LoopThread, StoreHandle, free_port
from voxserve.inference.v1 import inference_pb2_grpc as pb_grpc
from voxserve_common.tls import open_channel

MODES = {"consistent_hash": None, "round_robin": "roundrobin"}


def run_calls(stub: pb_grpc.InferenceStub, audio: bytes, models: Sequence[str], clients: int) -> list[CallResult]:
    """The calls, ``clients`` at a time (each thread takes the next model in order)."""
    work: queue.Queue[str] = queue.Queue()
    for model in models:
        work.put(model)
    results: list[CallResult] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                model = work.get_nowait()
            except queue.Empty:
                return
            result = transcribe_routed(stub, audio, model)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def one_mode(
    replicas: list[Replica], proxy: HAProxyProcess, secrets: Path, audio: bytes, calls: list[str], clients: int
) -> dict[str, Any]:
    for replica in replicas:
        replica.unload_all()
    channel = open_channel(proxy.address, client_tls(secrets))
    try:
        stub = pb_grpc.InferenceStub(channel)
        before = cache_counts(replicas)
        warm = run_calls(stub, audio, MODELS, 1)
        warmed = cache_counts(replicas)
        measured = run_calls(stub, audio, calls, clients)
        after = cache_counts(replicas)
    finally:
        channel.close()
    steady = total(after) - total(warmed)
    everything = total(after) - total(before)
    return {
        "calls": len(warm) + len(measured),
        "loads": everything.loads,
        "loads_per_100_calls": 100 * everything.loads / (len(warm) + len(measured)),
        "loads_after_warmup_per_100_calls": 100 * steady.loads / len(measured),
        "hit_ratio_after_warmup": steady.hit_ratio,
        "latency": benchlib.summarize([r.seconds for r in measured]),
        "p95_seconds": benchlib.percentile([r.seconds for r in measured], 95),
        "resent_calls": sum(r.attempts > 1 for r in measured),
        "copies_held": sum(len(r.loaded()) for r in replicas),
        "replicas_per_model": {m: len({r.replica for r in measured if r.model == m}) for m in MODELS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=150, help="calls per mode and round after the warm-up")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=1, help="calls in flight at once")
    parser.add_argument(
        "--balance-factor", type=int, help="hash-balance-factor instead of the deployed one (>= 300: no bound)"
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 40 calls")
    benchlib.add_run_options(parser, "bench_routing")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.rounds = 40, 1
    quiet, audit = benchlib.start_run(args, "bench_routing")
    audio = (DATA_DIR / "speech_short.wav").read_bytes()
    samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with benchlib.temp_dir("routing") as tmp:
        secrets = make_secrets(tmp / "secrets")
        loop = LoopThread()
        store_config = ModelStoreConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            data_dir=tmp / "store",
            hub_endpoints=(f"http://127.0.0.1:{free_port()}",),
            import_embedded=True,
            log_format="json",
            log_level="WARNING",
        )
        store = StoreHandle(loop, store_config, routing_catalog())
        replicas = start_replicas(tmp, 3, store.address, secrets, max_models=2, warmup=True)
        addresses = [r.address for r in replicas]
        proxies = {
            mode: HAProxyProcess(tmp, haproxy_config(addresses, balance, args.balance_factor), secrets, name=mode)
            for mode, balance in MODES.items()
        }
        try:
            for proxy in proxies.values():
                proxy.wait_status("by_model", {r.name: "UP" for r in replicas})
            for round_index in range(args.rounds):
                calls = zipf_models(args.calls, seed=19 + round_index)
                order = list(MODES) if round_index % 2 == 0 else list(reversed(MODES))
                for mode in order:
                    print(f"round {round_index + 1}/{args.rounds}: {mode}", flush=True)
                    samples[mode].append(one_mode(replicas, proxies[mode], secrets, audio, calls, args.clients))
        finally:
            for proxy in proxies.values():
                proxy.close()
            for replica in replicas:
                replica.close()
            store.stop()
            loop.close()
    report(args, samples, audit, quiet)


def report(
    args: argparse.Namespace, samples: dict[str, list[dict[str, Any]]], audit: Any, quiet: dict[str, float] | None
) -> None:
    rows = []
    results: dict[str, Any] = {}
    for mode, runs in samples.items():
        loads = [r["loads_per_100_calls"] for r in runs]
        results[mode] = {
            "runs": runs,
            "loads_per_100_calls": sum(loads) / len(loads),
            "loads_after_warmup_per_100_calls": sum(r["loads_after_warmup_per_100_calls"] for r in runs) / len(runs),
            "hit_ratio_after_warmup": sum(r["hit_ratio_after_warmup"] for r in runs) / len(runs),
            "p50_seconds": sum(r["latency"]["median"] for r in runs) / len(runs),
            "p95_seconds": sum(r["p95_seconds"] for r in runs) / len(runs),
        }
        r = results[mode]
        rows.append(
            [
                mode.replace("_", " "),
                f"{r['loads_per_100_calls']:.1f}",
                f"{r['loads_after_warmup_per_100_calls']:.1f}",
                f"{100 * r['hit_ratio_after_warmup']:.1f} %",
                benchlib.fmt_s(r["p50_seconds"]),
                benchlib.fmt_s(r["p95_seconds"]),
                str(runs[-1]["copies_held"]),
            ]
        )
    benchlib.print_table(
        f"{args.rounds} round(s) x ({len(MODELS)} warm-up + {args.calls} Zipf calls), {args.clients} client(s), "
        "3 replicas x 2 models",
        ["routing", "loads/100 calls", "after warm-up", "hit ratio", "p50", "p95", "copies held"],
        rows,
    )
    ch, rr = results["consistent_hash"], results["round_robin"]
    ratios = {
        "loads_rr_over_ch": rr["loads_per_100_calls"] / max(ch["loads_per_100_calls"], 1e-9),
        "p50_rr_over_ch": rr["p50_seconds"] / ch["p50_seconds"],
        "p95_rr_over_ch": rr["p95_seconds"] / ch["p95_seconds"],
    }
    print(
        f"round robin / consistent hashing: {ratios['loads_rr_over_ch']:.1f}x the loads, "
        f"p50 {ratios['p50_rr_over_ch']:.2f}x, p95 {ratios['p95_rr_over_ch']:.2f}x"
    )
    settings = {
        "calls": args.calls,
        "rounds": args.rounds,
        "clients": args.clients,
        "hash_balance_factor": args.balance_factor or "as deployed (150)",
        "replicas": 3,
        "max_models": 2,
        "models": list(MODELS),
        "audio": "tests/data/speech_short.wav (3.2 s), beam_size 1",
        "proxy": "haproxy 2.6 (Debian 12), deploy/haproxy/haproxy.cfg; round robin: by_model balanced roundrobin",
    }
    payload = {"settings": settings, "results": results, "ratios": ratios}
    benchlib.write_result(args.name, benchlib.rounded(payload), audit, quiet)


if __name__ == "__main__":
    main()
