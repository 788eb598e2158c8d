"""The budget (token bucket with a Retry-After hold) and the circuit breaker, driven by a clock the
test moves, plus the counters of a health window."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from device_client.routing.breaker import BreakerState, CircuitBreaker
from device_client.routing.budget import DEFAULT_HOLD_S, MAX_HOLD_S, TokenBucket, parse_retry_after
from device_client.routing.stats import RoutingStats


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def test_the_bucket_starts_full_spends_and_refills_per_minute():
    clock = Clock()
    bucket = TokenBucket(per_minute=60, burst=3, clock=clock)
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]
    clock.advance(1.0)  # 60/min: one token a second
    assert bucket.try_acquire()
    assert not bucket.try_acquire()
    clock.advance(3600)
    assert bucket.tokens() == pytest.approx(3)  # never more than the burst


def test_a_zero_rate_bucket_gives_only_its_burst():
    clock = Clock()
    bucket = TokenBucket(per_minute=0, burst=1, clock=clock)
    assert bucket.try_acquire()
    clock.advance(1e6)
    assert not bucket.try_acquire()


def test_a_retry_after_hold_stops_calls_until_it_ends():
    clock = Clock()
    bucket = TokenBucket(per_minute=600, burst=10, clock=clock)
    bucket.hold_for(5)
    assert bucket.held()
    assert not bucket.try_acquire()
    bucket.hold_for(1)  # a shorter hold does not shorten the one that is on
    clock.advance(4.9)
    assert not bucket.try_acquire()
    clock.advance(0.2)
    assert not bucket.held()
    assert bucket.try_acquire()
    bucket.hold_for(1e9)
    assert bucket.hold_remaining() == pytest.approx(MAX_HOLD_S)


def test_the_bucket_is_thread_safe():
    bucket = TokenBucket(per_minute=0, burst=500)
    got = []

    def spend():
        got.append(sum(bucket.try_acquire() for _ in range(200)))

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(got) == 500


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7.0),
        (" 12 ", 12.0),
        (None, DEFAULT_HOLD_S),
        ("", DEFAULT_HOLD_S),
        ("soon", DEFAULT_HOLD_S),
        ("-3", DEFAULT_HOLD_S),
        ("99999999", MAX_HOLD_S),
    ],
)
def test_retry_after_values(value, seconds):
    assert parse_retry_after(value) == seconds


def test_retry_after_as_an_http_date():
    now = datetime(2030, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now_epoch=now.timestamp()) == pytest.approx(30)
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(earlier, now_epoch=now.timestamp()) == 0.0


def test_the_breaker_opens_after_consecutive_failures_only():
    clock = Clock()
    b = CircuitBreaker(failures=3, open_s=10, probes=1, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    b.record_success()  # not consecutive any more
    for _ in range(2):
        b.record_failure()
    assert b.state is BreakerState.closed
    b.record_failure()
    assert b.state is BreakerState.open
    assert not b.allow()
    assert b.opened == 1


def test_half_open_lets_probes_through_and_closes_on_success():
    clock = Clock()
    b = CircuitBreaker(failures=1, open_s=10, probes=2, clock=clock)
    b.record_failure()
    clock.advance(9.9)
    assert not b.allow()
    clock.advance(0.2)
    assert b.state is BreakerState.half_open
    assert b.allow()
    assert b.allow()
    assert not b.allow()  # only two trials at a time
    b.record_success()
    assert b.state is BreakerState.closed
    assert b.allow()


def test_half_open_opens_again_on_a_failed_probe():
    clock = Clock()
    b = CircuitBreaker(failures=2, open_s=5, probes=1, clock=clock)
    b.record_failure()
    b.record_failure()
    clock.advance(5)
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.open
    assert not b.allow()
    clock.advance(5)
    assert b.allow()


def test_a_neutral_outcome_frees_the_probe_without_deciding():
    clock = Clock()
    b = CircuitBreaker(failures=1, open_s=1, probes=1, clock=clock)
    b.record_failure()
    clock.advance(1)
    assert b.allow()
    assert not b.allow()
    b.record_neutral()  # e.g. a 429: says nothing about the cloud's health
    assert b.state is BreakerState.half_open
    assert b.allow()


def test_stats_drain_a_window():
    clock = Clock()
    s = RoutingStats(clock=clock)
    for path in ("edge", "edge", "cloud", "cache"):
        s.answered(path)
    s.count("escalations", 2)
    s.count("budget_limited")
    s.cloud_failed("timeout")
    s.cloud_failed("timeout")
    s.cloud_failed("lying")
    for ms in range(1, 101):
        s.cloud_round_trip(float(ms))
    s.compared(True)
    s.compared(False)
    s.compared(True)
    clock.advance(10)
    w = s.drain()
    assert (w["requests"], w["edge"], w["cloud"], w["cache"]) == (4, 2, 1, 1)
    assert w["escalation_rate"] == 0.5
    assert (w["budget_limited"], w["cloud_failed"]) == (1, 3)
    assert w["cloud_failures"] == {"timeout": 2, "lying": 1}
    assert w["cloud_p95_ms"] == pytest.approx(95.0)
    assert (w["cloud_compared"], w["cloud_matches"]) == (3, 2)
    assert w["cloud_agreement"] == pytest.approx(2 / 3)
    assert w["window_s"] == 10
    empty = s.drain()
    assert (empty["requests"], empty["escalation_rate"], empty["cloud_p95_ms"], empty["cloud_agreement"]) == (
        0,
        None,
        None,
        None,
    )
