"""Process, host and event-loop metrics on a service's own registry, as real Prometheus text."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from voxserve_common.errors import InvalidArgument
from voxserve_common.metrics import ErrorCountingHandler, runtime_metrics


def scrape(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {s.name: [(x.labels, x.value) for x in f.samples if x.name == s.name] for f in families for s in f.samples}


def test_process_and_host_figures_are_exported(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    runtime = runtime_metrics(registry, {"data": tmp_path})
    assert runtime_metrics(registry) is runtime  # registered once per registry
    samples = scrape(registry)
    assert samples["process_resident_memory_bytes"][0][1] > 10 << 20
    assert samples["process_open_fds"][0][1] >= 3
    assert samples["process_cpu_seconds_total"][0][1] > 0
    assert samples["python_info"][0][0]["implementation"] == "CPython"
    assert (
        0 < samples["voxserve_host_memory_available_bytes"][0][1] <= samples["voxserve_host_memory_total_bytes"][0][1]
    )
    ((labels, free),) = samples["voxserve_host_disk_free_bytes"]
    assert labels == {"dir": "data"} and free == pytest.approx(
        os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize, rel=0.05
    )
    assert "voxserve_gpu_memory_used_bytes" not in samples  # no CUDA on this machine


def test_event_loop_lag_sees_a_blocked_loop() -> None:
    registry = CollectorRegistry()
    runtime = runtime_metrics(registry)

    async def main() -> None:
        watch = asyncio.create_task(runtime.watch_event_loop(interval=0.05))
        await asyncio.sleep(0.12)  # a few samples of an idle loop
        blocked_for = 0.4
        loop = asyncio.get_running_loop()
        end = loop.time() + blocked_for
        while loop.time() < end:  # hold the loop as a blocking call on it would
            pass
        await asyncio.sleep(0.01)
        watch.cancel()

    asyncio.run(main())
    samples = scrape(registry)
    assert samples["voxserve_event_loop_lag_observed_seconds_count"][0][1] >= 2
    # The sample that covered the blocked stretch saw most of it.
    assert samples["voxserve_event_loop_lag_observed_seconds_sum"][0][1] >= 0.3


def test_errors_are_counted_by_category_from_zero() -> None:
    registry = CollectorRegistry()
    runtime = runtime_metrics(registry)
    handler = ErrorCountingHandler(runtime.errors, "unit")
    log = logging.getLogger("voxserve.test.errors")
    log.addHandler(handler)
    try:
        before = scrape(registry)["voxserve_errors_total"]
        assert {labels["category"] for labels, value in before if value == 0} >= {"InvalidArgument", "Internal"}
        try:
            raise InvalidArgument("sample rate 0")
        except InvalidArgument:
            log.exception("request refused")
        log.error("disk full while writing state.json")
        log.warning("rpc finished", extra={"error_category": "NotFound"})
        log.info("pull started")
    finally:
        log.removeHandler(handler)
    counts = {labels["category"]: value for labels, value in scrape(registry)["voxserve_errors_total"]}
    assert (counts["InvalidArgument"], counts["Internal"], counts["NotFound"], counts["Unavailable"]) == (1, 1, 1, 0)
