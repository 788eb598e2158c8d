"""CPU time per request and resident memory in health windows: the recorder's mean, the host's
measurement around real onnxruntime sessions, and the window fields (device_client/health.py,
device_client/runtime/host.py, device_client/daemon/health_publisher.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np

from device_client.daemon.health_publisher import rss_bytes
from device_client.health import HealthRecorder
from device_client.protocol import ServeMode
from device_client.runtime import ModelHost, load_slot

X = np.random.default_rng(3).random((1, 4), dtype=np.float32)
AT = datetime(2030, 1, 1, tzinfo=UTC)


def test_the_window_mean_counts_only_measured_requests() -> None:
    rec = HealthRecorder(clock=lambda: 0.0)
    rec.record(1_000_000, cpu_ns=2_000_000)
    rec.record(1_000_000, cpu_ns=4_000_000)
    rec.record(1_000_000)  # not measured (a request answered without the edge model)
    stats = rec.snapshot_and_reset()
    assert stats.requests == 3
    assert stats.cpu_ms_per_request == 3.0
    assert rec.snapshot_and_reset().cpu_ms_per_request is None  # a new window: nothing measured


def test_a_swap_cuts_the_cpu_time_with_the_segment() -> None:
    rec = HealthRecorder(clock=lambda: 0.0)
    rec.record(1_000, cpu_ns=10_000_000)
    rec.mark(cut="1.0.0")
    rec.record(1_000, cpu_ns=1_000_000)
    [(version, old)] = rec.drain_closed()
    assert (version, old.cpu_ms_per_request) == ("1.0.0", 10.0)
    assert rec.snapshot_and_reset().cpu_ms_per_request == 1.0


def test_window_fields_carry_variant_cpu_and_rss() -> None:
    rec = HealthRecorder(clock=lambda: 0.0)
    rec.record(1_000, cpu_ns=500_000)
    rec.record_shadow(2_000, agreed=True)
    stats = rec.snapshot_and_reset()
    kw = {"device_id": "d1", "seq": 1, "at": AT, "model": "clf", "version": "2.0.0"}
    served = stats.to_health_window(**kw, mode=ServeMode.serve, variant="int8", rss_bytes=123 << 20)
    assert (served.variant, served.cpu_ms_per_request, served.rss_bytes) == ("int8", 0.5, 123 << 20)
    # a shadow candidate's window: the serving model's CPU time is not the candidate's
    shadow = stats.shadow_candidate().to_health_window(**kw, mode=ServeMode.shadow, variant="default")
    assert shadow.cpu_ms_per_request is None


def test_resident_memory_is_read_from_the_process() -> None:
    rss = rss_bytes()
    assert rss is not None
    before = rss
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB touched
    assert rss_bytes() >= before + (32 << 20)  # type: ignore[operator]
    del block


def test_the_host_measures_the_cpu_time_of_each_run(make_slot) -> None:
    """The CPU time of the thread running the session (one intra-op thread: all of it) is positive
    and never more than the wall time of the runs; a model with a MatMul chain costs more."""
    means = []
    for slow in (0, 8):
        host = ModelHost("clf", loader=lambda p: load_slot(p, intra_op_threads=1, warmup_runs=1))
        host.install(make_slot("1.0.0", slow_factor=slow))
        host.health.snapshot_and_reset()
        t0 = time.thread_time_ns()
        w0 = time.perf_counter_ns()
        results = [host.infer({"x": X}) for _ in range(50)]
        wall_ns, thread_ns = time.perf_counter_ns() - w0, time.thread_time_ns() - t0
        stats = host.health.snapshot_and_reset()
        assert stats.requests == 50
        assert stats.cpu_ms_per_request is not None
        total_ms = stats.cpu_ms_per_request * 50
        assert 0 < total_ms <= min(wall_ns, thread_ns) / 1e6
        assert all(r.cpu_ns is not None and r.cpu_ns >= 0 for r in results)
        means.append(stats.cpu_ms_per_request)
        host.close()
    assert means[1] > 2 * means[0]
