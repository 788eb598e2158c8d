"""Old health windows are folded into rollups and deleted; rollout gates read the same numbers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from server.health.repository import HealthWindowRepository
from server.health.rollup import fold_health
from server.health.series import fold_series, health_rows
from server.health.tables import HealthRollup, HealthSample
from server.rollouts.policy import aggregate

NOW = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)
DAY = 86400


def window(device: str, seq: int, at: datetime, **kw) -> dict:
    row = {
        "device_id": device, "seq": seq, "at": at, "window_s": 10.0, "model": "det", "version": "1.0.0",
        "mode": "serve", "requests": 100, "errors": 1, "p50_ms": 1.0, "p95_ms": 5.0, "p99_ms": 9.0,
        "shadow_requests": None, "agreement": None, "shadow_p95_ms": None,
    }  # fmt: skip
    row.update(kw)
    return row


def fold(ctx, now=NOW):
    return fold_health(ctx.db, raw_retention_s=DAY, bucket_s=3600, rollup_retention_s=30 * DAY, now=now)


def agg(ctx, devices, **kw):
    with ctx.db.session_scope() as s:
        return aggregate(HealthWindowRepository(s).windows(devices, "det", **kw))


def counts(ctx) -> tuple[int, int]:
    with ctx.db.session_scope() as s:
        raw = s.scalar(sa.select(sa.func.count()).select_from(HealthSample))
        rollups = s.scalar(sa.select(sa.func.count()).select_from(HealthRollup))
    return raw, rollups


def test_fold_keeps_aggregates_exact_and_bounds_the_raw_table(ctx):
    old = datetime(2026, 3, 7, 10, 0, tzinfo=UTC)  # three days before NOW, on an hour boundary
    rows = []
    for d in ("a", "b"):
        for i in range(30):  # every 3 minutes for 90 minutes: two hourly buckets
            at = old + timedelta(minutes=i * 3)
            rows.append(window(d, i, at, requests=100 + i, errors=i % 4, p95_ms=4.0 + i % 7))
        rows.append(window(d, 100, old, requests=50, p95_ms=None))  # a window without a p95
        rows.append(window(d, 101, old + timedelta(minutes=5), mode="shadow", version="2.0.0",
                           shadow_requests=40, agreement=0.9))  # fmt: skip
        rows.append(window(d, 102, old + timedelta(minutes=6), mode="shadow", version="2.0.0",
                           shadow_requests=60, agreement=0.5))  # fmt: skip
        rows.append(window(d, 200, NOW - timedelta(hours=1)))  # recent: stays raw
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(HealthSample.__table__), rows)

    queries = [
        {"version": "1.0.0", "mode": "serve"},
        {"not_version": "2.0.0", "mode": "serve", "since": old - timedelta(days=1), "until": NOW},
        {"version": "2.0.0", "mode": "shadow"},
        {},
    ]
    before = [agg(ctx, ["a", "b"], **q) for q in queries]
    one_device = agg(ctx, ["a"], version="1.0.0")
    result = fold(ctx)
    assert result.folded == 2 * 33
    assert counts(ctx) == (2, 2 * 3)  # recent windows; per device two serve buckets and one shadow
    after = [agg(ctx, ["a", "b"], **q) for q in queries]
    for b, a in zip(before, after, strict=True):
        assert (a.requests, a.errors, a.shadow_requests) == (b.requests, b.errors, b.shadow_requests)
        assert a.p95_ms == pytest.approx(b.p95_ms)
        if b.agreement is None:
            assert a.agreement is None
        else:
            assert a.agreement == pytest.approx(b.agreement)
    assert after[2].agreement == pytest.approx(0.66)
    alone = agg(ctx, ["a"], version="1.0.0")
    assert (alone.requests, alone.errors) == (one_device.requests, one_device.errors)
    assert alone.p95_ms == pytest.approx(one_device.p95_ms)
    assert fold(ctx).folded == 0  # nothing left to fold


def test_the_gates_per_device_sums_are_the_same_after_a_fold(ctx):
    """The gates judge each device's sums (HealthWindowRepository.per_device): a fold into
    rollups changes none of them."""
    old = datetime(2026, 3, 7, 10, 0, tzinfo=UTC)
    rows = [
        window(d, i, old + timedelta(minutes=3 * i), requests=100 * k + i, errors=i % 3, p95_ms=k + i % 5)
        for k, d in enumerate(("a", "b", "c"), start=1)
        for i in range(25)
    ]
    rows.append(window("a", 100, old, requests=40, p95_ms=None))
    rows.append(window("b", 101, old, mode="shadow", version="2.0.0", shadow_requests=30, agreement=0.8))
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(HealthSample.__table__), rows)

    def sums(**kw):
        with ctx.db.session_scope() as s:
            return HealthWindowRepository(s).per_device(["a", "b", "c"], "det", **kw)

    queries = [{"version": "1.0.0", "mode": "serve"}, {"version": "2.0.0", "mode": "shadow"}, {}]
    before = [sums(**q) for q in queries]
    assert fold(ctx).folded == len(rows)
    after = [sums(**q) for q in queries]
    for b, a in zip(before, after, strict=True):
        assert set(a) == set(b)
        for device, health in b.items():
            assert (a[device].requests, a[device].errors, a[device].windows) == (
                health.requests, health.errors, health.windows,
            )  # fmt: skip
            assert a[device].p95_requests == health.p95_requests
            assert a[device].p95_weighted_ms == pytest.approx(health.p95_weighted_ms)
            assert a[device].shadow_requests == health.shadow_requests
            assert a[device].agreement_weighted == pytest.approx(health.agreement_weighted)
    assert before[0]["a"].p95_requests == before[0]["a"].requests - 40  # the window without a p95
    assert before[1]["b"].agreement_weighted == pytest.approx(24.0)


def test_the_hybrid_series_are_the_same_after_a_fold(ctx):
    """Escalation rate and cloud agreement per bucket (the rollout charts) read the rollups' sums."""
    old = datetime(2026, 3, 7, 10, 0, tzinfo=UTC)
    rows = [
        window(d, i, old + timedelta(minutes=3 * i), requests=100 * k, escalations=k * i % 40,
               cloud_compared=k * i % 40, cloud_agreement=0.5 + (i % 5) / 10, answered_cloud=k * i % 40)
        for k, d in enumerate(("a", "b"), start=1)
        for i in range(30)
    ]  # fmt: skip
    none = dict.fromkeys(("escalations", "cloud_compared", "cloud_agreement", "answered_cloud"))
    rows.append(window("a", 100, old, requests=70, **none))  # no routing policy: not in the rates
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(HealthSample.__table__), rows)

    def series():
        with ctx.db.session_scope() as s:
            return fold_series(health_rows(s, ["a", "b"], "det", old), old, 3600)

    before = series()
    assert fold(ctx).folded == len(rows)
    (after,) = series()
    points = before[0]["points"]
    assert [p["at"] for p in after["points"]] == [p["at"] for p in points]
    for b, a in zip(points, after["points"], strict=True):
        assert (a["routed_requests"], a["cloud_compared"]) == (b["routed_requests"], b["cloud_compared"])
        assert a["routed_requests"] == a["requests"] - (70 if a["at"] == old.isoformat() else 0)
        assert a["escalation_rate"] == pytest.approx(b["escalation_rate"])
        assert a["cloud_agreement"] == pytest.approx(b["cloud_agreement"])
    assert points[0]["escalation_rate"] == pytest.approx(
        sum((k * i % 40) for k in (1, 2) for i in range(20)) / sum(100 * k * 20 for k in (1, 2))
    )


def test_late_windows_add_to_their_rollup_and_old_rollups_expire(ctx):
    old = NOW - timedelta(days=2)
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(HealthSample.__table__), [window("a", 1, old, requests=10, errors=1)])
    fold(ctx)
    with ctx.db.session_scope() as s:  # a window for the same bucket arrives after the fold
        late = window("a", 2, old + timedelta(seconds=1), requests=30)
        s.execute(sa.insert(HealthSample.__table__), [late])
    fold(ctx)
    assert counts(ctx) == (0, 1)
    with ctx.db.session_scope() as s:
        r = s.scalars(sa.select(HealthRollup)).one()
        assert (r.windows, r.requests, r.errors, r.p95_requests) == (2, 40, 2, 40)
    result = fold(ctx, now=NOW + timedelta(days=40))
    assert result.expired_rollups == 1
    assert counts(ctx) == (0, 0)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_replicas_folding_at_once_never_fold_a_window_twice(ctx):
    """A window another server has claimed (row locked) is skipped, not counted again."""
    from server.health.repository import HealthRollupRepository

    old = NOW - timedelta(days=2)
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(HealthSample.__table__), [window("a", i, old, requests=10) for i in range(4)])
    with ctx.db.session_scope() as other:  # the other replica, mid-fold, holds two windows
        held = HealthRollupRepository(other).claim_raw(NOW, 2, skip_locked=True)
        assert len(held) == 2
        assert fold(ctx).folded == 2
    assert counts(ctx) == (2, 1)
    assert fold(ctx).folded == 2
    with ctx.db.session_scope() as s:
        assert s.scalars(sa.select(HealthRollup.requests)).one() == 40


def test_gates_read_only_the_given_devices_however_many(ctx):
    """The stage and baseline numbers cover exactly the devices asked for, however many and
    whatever their ids hold (they go to the database as one array parameter: without the device
    filter the gates would read every device running the version, healthy devices of other
    rollouts included)."""
    at = NOW - timedelta(minutes=5)
    odd = ['q"uote', "back\\slash", "com,ma", "{brace}", "sp ace", "NULL"]
    asked = [f"d{i}" for i in range(5)] + odd
    rows = [window(d, 1, at, requests=100, errors=10) for d in asked]
    rows += [window(f"other{i}", 1, at, requests=100, errors=0) for i in range(20)]
    rows += [window(d, 1, at, requests=100, errors=0) for d in ("quote", "back", "com", "ma", "brace", "sp")]
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(HealthSample.__table__), rows)
    stage = agg(ctx, [*asked, "d0"])  # a duplicate id counts once
    assert (stage.requests, stage.errors) == (1100, 110)
    with ctx.db.session_scope() as s:
        sums = HealthWindowRepository(s).per_device([*asked, f"d{10**6}"], "det")
        series = fold_series(health_rows(s, asked, "det", at), at, 60)
    assert set(sums) == set(asked)
    assert [p["requests"] for p in series[0]["points"]] == [1100]
    assert agg(ctx, []).requests == 0


def test_cpu_time_and_variant_read_the_same_after_the_fold(ctx):
    old = datetime(2026, 3, 7, 10, 0, tzinfo=UTC)
    rows = [
        window("a", 1, old, requests=100, cpu_ms_per_request=2.0, variant="int8", rss_bytes=50 << 20),
        window("a", 2, old + timedelta(minutes=5), requests=300, cpu_ms_per_request=4.0, variant="int8"),
        window("a", 3, old + timedelta(minutes=10), requests=1000),  # no CPU time: not counted
        window("b", 1, old, requests=10),  # an older device: neither CPU time nor variant
        window("a", 4, NOW - timedelta(hours=1), requests=100, cpu_ms_per_request=8.0, variant="int8"),
    ]
    rows = [dict.fromkeys(("variant", "cpu_ms_per_request", "rss_bytes")) | r for r in rows]
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(HealthSample.__table__), rows)

    def sums():
        with ctx.db.session_scope() as s:
            return HealthWindowRepository(s).per_device(["a", "b"], "det", version="1.0.0")

    before = sums()
    assert fold(ctx).folded == 4
    after = sums()
    for found in (before, after):
        a, b = found["a"], found["b"]
        assert (a.cpu_requests, a.variant, b.cpu_requests, b.variant) == (500, "int8", 0, None)
        assert a.cpu_weighted_ms == pytest.approx(2.0 * 100 + 4.0 * 300 + 8.0 * 100)
    with ctx.db.session_scope() as s:
        variants = s.scalars(sa.select(HealthRollup.variant).order_by(HealthRollup.device_id)).all()
    assert variants == ["int8", None]
