"""Plausibility of health windows (server/health/plausibility.py): what one window may claim, and
one window per device, model, version and mode for any period."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from device_client.protocol import HealthWindow
from server.health.plausibility import Limits, implausible, overlapping, span_queries

NOW = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
LIMITS = Limits(max_rps=1000.0, max_window_s=600.0, max_clock_skew_s=300.0)


def window(
    seq: int = 1, *, end_s: float = 0.0, window_s: float = 10.0, device: str = "d1", **kw
) -> HealthWindow:
    fields = {"device_id": device, "seq": seq, "at": NOW + timedelta(seconds=end_s), "window_s": window_s,
              "model": "det", "version": "2.0.0", "requests": 100, "errors": 1, "p95_ms": 4.0}  # fmt: skip
    return HealthWindow.build(**{**fields, **kw})


def stored(h: HealthWindow) -> SimpleNamespace:
    return SimpleNamespace(device_id=h.device_id, model=h.model, version=h.version, mode=h.mode.value,
                           seq=h.seq, at=h.at, window_s=h.window_s)  # fmt: skip


def test_a_true_window_passes():
    assert implausible(window(), NOW, LIMITS) is None
    assert implausible(window(requests=10_000, errors=10_000), NOW, LIMITS) is None  # 1000/s, all failed
    assert implausible(window(requests=0, errors=0, window_s=1e-6), NOW, LIMITS) is None
    assert implausible(window(requests=1, errors=0, window_s=1e-6), NOW, LIMITS) is None  # one at least


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"requests": 10, "errors": 11}, "implausible_errors"),
        ({"requests": 2**31 - 1, "errors": 0}, "implausible_rate"),
        ({"requests": 10_001}, "implausible_rate"),  # 1000/s over 10 s at most
        ({"mode": "shadow", "requests": 10, "shadow_requests": 20_000, "agreement": 1.0}, "implausible_rate"),
        ({"window_s": 601.0, "requests": 0, "errors": 0}, "implausible_window"),
        ({"end_s": 301.0}, "clock_skew"),
        ({"end_s": -301.0}, "clock_skew"),
    ],
)
def test_an_impossible_window_is_named(fields, reason):
    wrong = implausible(window(**fields), NOW, LIMITS)
    assert wrong is not None
    assert wrong[0] == reason


def test_one_window_per_period():
    first = window(1, end_s=-10.0)
    again = [
        window(2, end_s=-5.0),  # half of the first one's period again
        window(3, end_s=-10.0, window_s=1.0),  # inside it
        window(4, end_s=-10.0),  # the same period under a new seq
    ]
    assert overlapping(again, [stored(first)]) == [0, 1, 2]
    # consecutive periods, jitter of a few milliseconds between them, and other keys are fine
    fine = [
        window(5, end_s=0.0),
        window(6, end_s=10.003),
        window(7, end_s=0.0, version="1.0.0"),
        window(8, end_s=0.0, mode="shadow", shadow_requests=10, agreement=1.0),
        window(9, end_s=0.0, device="d2"),
        window(1, end_s=-10.0),  # the stored window itself, re-sent: a duplicate for the store to drop
    ]
    assert overlapping(fine, [stored(first)]) == []


def test_windows_of_one_batch_are_checked_against_each_other():
    batch = [window(1, end_s=0.0), window(2, end_s=3.0), window(3, end_s=10.0)]
    assert overlapping(batch, []) == [1]  # the third still follows the first: it is accepted


def test_tolerance_is_never_more_than_half_the_shorter_window():
    """Short windows sharing more than half of their length claim one period twice."""
    first = [stored(window(1, end_s=0.0, window_s=0.2))]
    assert overlapping([window(2, end_s=0.05, window_s=0.2)], first) == [0]  # 0.15 s shared
    assert overlapping([window(2, end_s=0.1, window_s=0.2)], first) == []  # 0.1 s: half, tolerated


def test_span_queries_keep_a_long_window_to_its_own_query():
    batch = [window(1, device="a"), window(1, device="b"), window(1, device="c", window_s=600.0)]
    queries = span_queries(batch)
    assert queries == [(["c"], NOW - timedelta(seconds=600)), (["a", "b"], NOW - timedelta(seconds=10))]
