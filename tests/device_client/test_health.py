"""HealthRecorder (counts, windows, marks, threads) and the pure probation rule."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from device_client.health import (
    MIN_SAMPLE,
    HealthRecorder,
    ProbationOutcome,
    WindowStats,
    evaluate_probation,
    percentile_ms,
)
from device_client.protocol import Probation, ServeMode

MS = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_percentiles_nearest_rank() -> None:
    lat = sorted(i * MS for i in range(1, 101))  # 1..100 ms
    assert percentile_ms(lat, 0.5) == 50.0
    assert percentile_ms(lat, 0.95) == 95.0
    assert percentile_ms(lat, 0.99) == 99.0
    assert percentile_ms([7 * MS], 0.99) == 7.0
    assert percentile_ms([], 0.5) is None


def test_window_snapshot_and_reset() -> None:
    clock = Clock()
    rec = HealthRecorder(clock=clock)
    for i in range(1, 101):
        rec.record(i * MS, ok=i % 10 != 0)
    clock.t += 10
    w = rec.snapshot_and_reset()
    assert (w.requests, w.errors, w.window_s) == (100, 10, 10.0)
    assert (w.p50_ms, w.p95_ms, w.p99_ms) == (50.0, 95.0, 99.0)
    assert w.error_rate == pytest.approx(0.1)
    assert w.agreement is None
    empty = rec.snapshot_and_reset()
    assert (empty.requests, empty.errors, empty.p95_ms) == (0, 0, None)


def test_shadow_counts() -> None:
    rec = HealthRecorder()
    for i in range(10):
        rec.record(MS)
        rec.record_shadow(2 * MS, agreed=i < 7, error=i == 9)
    rec.record_shadow_drop()
    w = rec.snapshot_and_reset()
    assert (w.shadow_requests, w.shadow_agreed, w.shadow_errors, w.shadow_dropped) == (10, 7, 1, 1)
    assert w.agreement == pytest.approx(0.7)
    assert w.shadow_p95_ms == 2.0


def test_since_mark_is_independent_of_windows() -> None:
    clock = Clock()
    rec = HealthRecorder(clock=clock)
    rec.record(100 * MS, ok=False)  # old model, before the swap
    rec.mark()
    for _ in range(30):
        rec.record(MS)
    rec.snapshot_and_reset()  # publishing windows must not reset the period
    rec.record(3 * MS, ok=False)
    clock.t += 5
    p = rec.since_mark()
    assert (p.requests, p.errors, p.window_s) == (31, 1, 5.0)
    assert p.p99_ms == 3.0


def test_reservoir_keeps_memory_bounded_and_counts_exact() -> None:
    rec = HealthRecorder(reservoir_size=64, seed=1)
    rec.mark()
    for i in range(10_000):
        rec.record((i % 100 + 1) * MS)
    p = rec.since_mark()
    assert p.requests == 10_000
    assert len(rec._period.latencies) == 64
    assert p.p50_ms is not None
    assert 20.0 <= p.p50_ms <= 80.0  # a uniform sample of 1..100 ms


def test_concurrent_recording_loses_nothing() -> None:
    rec = HealthRecorder()

    def work() -> None:
        for i in range(5000):
            rec.record(MS, ok=i % 100 != 0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    snaps = []
    for t in threads:
        t.start()
    for _ in range(20):
        snaps.append(rec.snapshot_and_reset())
    for t in threads:
        t.join()
    snaps.append(rec.snapshot_and_reset())
    assert sum(s.requests for s in snaps) == 20_000
    assert sum(s.errors for s in snaps) == 200


def test_to_health_window() -> None:
    w = WindowStats(10.0, 50, 1, 1.0, 2.0, 3.0, shadow_requests=5, shadow_agreed=5, shadow_p95_ms=4.0)
    at = datetime(2025, 1, 1, tzinfo=UTC)
    hw = w.to_health_window(device_id="d-1", seq=3, at=at, model="m", version="1.0.0", mode=ServeMode.shadow)
    assert (hw.requests, hw.errors, hw.p95_ms, hw.agreement, hw.shadow_requests) == (50, 1, 2.0, 1.0, 5)
    plain = w.to_health_window(
        device_id="d-1", seq=4, at=at, model="m", version="1.0.0", mode=ServeMode.serve
    )
    assert plain.agreement is None
    assert plain.shadow_requests is None


# --------------------------------------------------------------------------- probation rule


def stats(requests: int, errors: int = 0, p95: float | None = 5.0) -> WindowStats:
    return WindowStats(1.0, requests, errors, p95, p95, p95)


P = Probation(seconds=60, min_requests=100, max_error_rate=0.05, max_p95_ms=50.0, max_p95_ratio=1.5)


def test_passes_after_seconds_with_enough_requests() -> None:
    v = evaluate_probation(stats(100, 2), P, baseline_p95_ms=4.0, elapsed_s=60)
    assert v.outcome is ProbationOutcome.passed
    assert v.numbers["p95_ratio"] == pytest.approx(1.25)


def test_continues_before_seconds_even_when_healthy() -> None:
    v = evaluate_probation(stats(500, 0), P, baseline_p95_ms=4.0, elapsed_s=30)
    assert v.outcome is ProbationOutcome.continue_
    assert "30.0/60" in v.reason


def test_continues_past_seconds_while_traffic_is_missing() -> None:
    v = evaluate_probation(stats(99, 0), P, baseline_p95_ms=4.0, elapsed_s=600)
    assert v.outcome is ProbationOutcome.continue_
    assert "99/100" in v.reason


def test_error_rate_fails_once_min_requests_reached() -> None:
    v = evaluate_probation(stats(100, 6), P, baseline_p95_ms=None, elapsed_s=10)
    assert v.outcome is ProbationOutcome.failed
    assert "error rate 6.00%" in v.reason
    assert v.numbers["errors"] == 6


def test_error_rate_at_limit_is_fine() -> None:
    assert evaluate_probation(stats(100, 5), P, None, 60).outcome is ProbationOutcome.passed


def test_a_few_early_errors_do_not_fail_yet() -> None:
    # 5 errors in 10 requests: at 100 requests the rate could still be 5%
    assert evaluate_probation(stats(10, 5), P, None, 1).outcome is ProbationOutcome.continue_


def test_overwhelming_errors_fail_immediately() -> None:
    v = evaluate_probation(stats(6, 6), P, None, 1)
    assert v.outcome is ProbationOutcome.failed
    assert "even if the rest" in v.reason


def test_zero_error_budget_fails_on_first_error() -> None:
    p = Probation(seconds=60, min_requests=0, max_error_rate=0.0)
    assert evaluate_probation(stats(1, 1), p, None, 0.5).outcome is ProbationOutcome.failed
    assert evaluate_probation(stats(1, 0), p, None, 0.5).outcome is ProbationOutcome.continue_


def test_min_sample_protects_small_min_requests() -> None:
    p = Probation(seconds=60, min_requests=0, max_error_rate=0.1)
    # one error in 3 requests is 33%, but only 1 <= 0.1 * MIN_SAMPLE errors: not judged yet
    assert evaluate_probation(stats(3, 1), p, None, 1).outcome is ProbationOutcome.continue_
    # at the end of the period whatever was seen is judged
    assert evaluate_probation(stats(3, 1), p, None, 60).outcome is ProbationOutcome.failed
    assert evaluate_probation(stats(MIN_SAMPLE, 3), p, None, 1).outcome is ProbationOutcome.failed


def test_no_traffic_no_min_requests_passes() -> None:
    p = Probation(seconds=10, min_requests=0)
    assert evaluate_probation(stats(0, 0, None), p, None, 10).outcome is ProbationOutcome.passed


def test_absolute_p95_limit() -> None:
    v = evaluate_probation(stats(100, 0, p95=51.0), P, None, 5)
    assert v.outcome is ProbationOutcome.failed
    assert "p95 51.000 ms exceeds 50 ms" in v.reason


def test_p95_ratio_against_baseline() -> None:
    v = evaluate_probation(stats(100, 0, p95=7.0), P, baseline_p95_ms=4.0, elapsed_s=5)
    assert v.outcome is ProbationOutcome.failed
    assert "1.75x the baseline" in v.reason
    # without a baseline there is no ratio to check
    assert evaluate_probation(stats(100, 0, p95=7.0), P, None, 60).outcome is ProbationOutcome.passed


def test_latency_not_judged_on_a_tiny_sample() -> None:
    assert evaluate_probation(stats(5, 0, p95=999.0), P, 1.0, 5).outcome is ProbationOutcome.continue_


def test_all_breaches_reported_together() -> None:
    v = evaluate_probation(stats(200, 50, p95=100.0), P, baseline_p95_ms=10.0, elapsed_s=5)
    assert v.outcome is ProbationOutcome.failed
    assert len(v.reasons) == 3


def test_a_cut_closes_the_served_part_of_the_window_under_the_old_version() -> None:
    clock = Clock()
    rec = HealthRecorder(clock=clock)
    for _ in range(3):
        rec.record(MS)
    rec.record(2 * MS, ok=False)
    rec.record_shadow(MS, agreed=True)
    clock.t += 2
    rec.mark(cut="1.0.0")  # the swap: 1.0.0 served the window so far
    rec.record(5 * MS)
    clock.t += 3
    closed = rec.drain_closed()
    assert [(v, s.requests, s.errors, s.window_s, s.p95_ms) for v, s in closed] == [("1.0.0", 4, 1, 2.0, 2.0)]
    assert rec.drain_closed() == []
    w = rec.snapshot_and_reset()  # only the new model's requests; shadow comparisons stay
    assert (w.requests, w.errors, w.window_s, w.p95_ms) == (1, 0, 3.0, 5.0)
    assert (w.shadow_requests, w.shadow_agreed) == (1, 1)
    assert rec.since_mark().requests == 1  # the period restarted at the cut too


def test_cuts_without_requests_close_nothing_and_are_bounded() -> None:
    from device_client.health import MAX_CLOSED

    rec = HealthRecorder()
    rec.mark(cut="1.0.0")
    assert rec.drain_closed() == []
    for i in range(MAX_CLOSED + 5):
        rec.record(MS)
        rec.mark(cut=f"v{i}")
    closed = rec.drain_closed()
    assert len(closed) == MAX_CLOSED
    assert closed[0][0] == "v5"
    assert closed[-1][0] == f"v{MAX_CLOSED + 4}"
