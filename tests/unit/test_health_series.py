"""Folding health windows into per-version time buckets (server/health/series.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from server.health.series import fold_series

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def row(
    device, version, offset_s, requests, errors, p95=None, mode="serve", shadow=0, agreement=None,
    cpu=None, rss=None, escalations=None, compared=0, cloud_agreement=None,
):  # fmt: skip
    p95_req = requests if p95 is not None else 0
    cpu_req = requests if cpu is not None else 0
    routed = requests if escalations is not None else 0
    return (
        device, version, mode, T0 + timedelta(seconds=offset_s), requests, errors, p95_req,
        (p95 or 0.0) * p95_req, shadow, (agreement or 0.0) * shadow, cpu_req, (cpu or 0.0) * cpu_req, rss,
        routed, escalations or 0, compared, (cloud_agreement or 0.0) * compared,
    )  # fmt: skip


def test_windows_fold_per_version_mode_and_bucket_request_weighted():
    rows = [
        row("a", "1.0.0", 5, 100, 1, p95=10.0),
        row("b", "1.0.0", 50, 300, 3, p95=20.0),  # same bucket as the first: weighted by requests
        row("a", "2.0.0", 70, 100, 10, p95=30.0),
        row("a", "2.0.0", 200, 100, 0),  # no p95 reported: the bucket has none
        row("b", "2.0.0", 75, 0, 0, mode="shadow", shadow=50, agreement=0.9),
    ]
    series = fold_series(rows, T0, 60)
    assert [(s["version"], s["mode"]) for s in series] == [
        ("1.0.0", "serve"), ("2.0.0", "serve"), ("2.0.0", "shadow"),
    ]  # fmt: skip
    (old,) = series[0]["points"]
    assert old["at"] == T0.isoformat()
    assert old["requests"] == 400
    assert old["error_rate"] == 4 / 400
    assert old["p95_ms"] == (10.0 * 100 + 20.0 * 300) / 400
    assert old["devices"] == 2
    first, later = series[1]["points"]
    assert first["at"] == (T0 + timedelta(seconds=60)).isoformat()
    assert later["at"] == (T0 + timedelta(seconds=180)).isoformat()  # empty buckets are skipped
    assert later["p95_ms"] is None
    assert later["error_rate"] == 0
    (shadow,) = series[2]["points"]
    assert shadow["agreement"] == 0.9
    assert shadow["error_rate"] is None  # no served request in a shadow window


def test_rollups_stamped_before_the_start_count_in_the_first_bucket():
    series = fold_series([row("a", "1.0.0", -30, 10, 0)], T0, 60)
    assert series[0]["points"][0]["at"] == T0.isoformat()
    assert fold_series([], T0, 60) == []


def test_hybrid_rates_weighted_by_routed_requests_and_by_comparisons():
    rows = [
        row("a", "2.0.0", 5, 900, 0, escalations=90, compared=90, cloud_agreement=0.9),
        row("b", "2.0.0", 10, 100, 0, escalations=50, compared=50, cloud_agreement=0.5),
        row("c", "2.0.0", 20, 500, 0),  # no routing policy: not in the escalation rate's requests
        row("a", "2.0.0", 70, 100, 0, escalations=0),  # routed, nothing escalated, nothing compared
        row("a", "1.0.0", 5, 100, 0),
    ]
    old, new = fold_series(rows, T0, 60)
    assert old["points"][0]["escalation_rate"] is None  # no window under a routing policy
    assert old["points"][0]["cloud_agreement"] is None
    first, later = new["points"]
    assert first["routed_requests"] == 1000
    assert first["escalation_rate"] == 140 / 1000  # not the mean of the windows' rates (0.3)
    assert first["cloud_compared"] == 140
    assert first["cloud_agreement"] == (0.9 * 90 + 0.5 * 50) / 140  # not their mean (0.7)
    assert later["escalation_rate"] == 0
    assert later["cloud_agreement"] is None


def test_cpu_per_request_is_request_weighted_and_rss_is_the_largest():
    rows = [
        row("a", "2.0.0", 5, 100, 0, cpu=2.0, rss=100 << 20),
        row("b", "2.0.0", 10, 300, 0, cpu=6.0, rss=300 << 20),
        row("c", "2.0.0", 20, 1000, 0),  # an older device: no CPU time, no memory
    ]
    (point,) = fold_series(rows, T0, 60)[0]["points"]
    assert point["cpu_ms_per_request"] == (2.0 * 100 + 6.0 * 300) / 400
    assert point["rss_bytes"] == 300 << 20
    (old,) = fold_series([row("c", "1.0.0", 5, 10, 0)], T0, 60)[0]["points"]
    assert (old["cpu_ms_per_request"], old["rss_bytes"]) == (None, None)
