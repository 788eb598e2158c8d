"""The routing fields of health windows stored at ingest, and
``GET /api/v1/models/{name}/field-accuracy``: per version and time bucket, the numbers the stored
windows add up to, the same once they are folded into rollups. Simulated devices
(tests/helpers/fleet_sim.py) through the real ingest."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from device_client.protocol.messages import utcnow
from server.health.rollup import fold_health
from server.health.tables import HealthSample
from tests.helpers.fleet_sim import Behaviour, SimFleet
from tests.helpers.rollout_lab import make_lab

#: 1.0.0 escalates 20% and agrees with the cloud on 90%; 2.0.0 escalates half and agrees on 60%
BEHAVIOURS = {
    "1.0.0": Behaviour(escalation_rate=0.2, cloud_agreement=0.9),
    "2.0.0": Behaviour(escalation_rate=0.5, cloud_agreement=0.6),
}


@pytest.fixture
def lab(app_client, admin_headers, ctx, onnx_model) -> SimFleet:
    """Ten devices, five serving det 1.0.0 and five 2.0.0, each reporting two windows of 100
    requests under a routing policy."""
    fleet = make_lab(app_client, admin_headers, ctx, onnx_model, behaviours=BEHAVIOURS, baseline=False)
    for device_id in sorted(fleet.devices)[5:]:
        fleet.devices[device_id].serving = {"det": "2.0.0"}
    fleet.health(at_offset_s=-2)
    fleet.health(at_offset_s=-1)
    return fleet


def accuracy(client, headers, **params) -> dict:
    r = client.get("/api/v1/models/det/field-accuracy", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


EXPECTED = {
    "2.0.0": {"requests": 1000, "routed_requests": 1000, "escalations": 500, "escalation_rate": 0.5,
              "cloud_compared": 500, "cloud_agreement": 0.6, "answered_edge": 500, "answered_cloud": 500,
              "answered_cache": 0, "budget_limited": 0, "breaker_open": 0, "cloud_failed": 0},
    "1.0.0": {"requests": 1000, "routed_requests": 1000, "escalations": 200, "escalation_rate": 0.2,
              "cloud_compared": 200, "cloud_agreement": 0.9, "answered_edge": 800, "answered_cloud": 200,
              "answered_cache": 0, "budget_limited": 0, "breaker_open": 0, "cloud_failed": 0},
}  # fmt: skip


def check(data: dict, bucket_s: int) -> None:
    assert [v["version"] for v in data["versions"]] == ["2.0.0", "1.0.0"]  # newest release first
    for v in data["versions"]:
        totals = {k: v[k] for k in EXPECTED[v["version"]]}
        assert totals == pytest.approx(EXPECTED[v["version"]]), v["version"]
        # the buckets add up to the totals (the windows may straddle a bucket boundary)
        assert sum(b["requests"] for b in v["buckets"]) == v["requests"]
        assert sum(b["escalations"] for b in v["buckets"]) == v["escalations"]
        for b in v["buckets"]:
            start = datetime.fromisoformat(b["start"].replace("Z", "+00:00"))
            assert int(start.timestamp()) % bucket_s == 0


def test_the_routing_fields_are_stored(app_client, admin_headers, ctx, lab):
    device = sorted(lab.devices)[0]
    with ctx.db.session_scope() as s:
        rows = s.scalars(sa.select(HealthSample).where(HealthSample.device_id == device)).all()
        got = [
            (r.answered_edge, r.answered_cloud, r.escalations, r.escalation_rate, r.cloud_p95_ms,
             r.cloud_compared, r.cloud_agreement, r.answered_cache, r.budget_limited)
            for r in rows
        ]  # fmt: skip
    assert got == [(80, 20, 20, 0.2, 40.0, 20, 0.9, 0, 0)] * 2


def test_field_accuracy_from_the_stored_windows_and_their_rollups(
    app_client, admin_headers, ctx, lab, make_token
):
    viewer = {"Authorization": f"Bearer {make_token('viewer')}"}
    check(accuracy(app_client, viewer, bucket_s=3600), 3600)
    check(accuracy(app_client, viewer, bucket_s=60), 60)
    folded = fold_health(ctx.db, raw_retention_s=0, bucket_s=3600, rollup_retention_s=86400,
                         now=utcnow() + timedelta(hours=2))  # fmt: skip
    assert folded.folded == 20
    with ctx.db.session_scope() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(HealthSample)) == 0
    check(accuracy(app_client, viewer, bucket_s=3600), 3600)


def test_since_bounds_the_span(app_client, admin_headers, ctx, lab):
    """The windows end one and two seconds before the lab was ready: a span that starts half a
    second ago holds none of them, one that starts a minute ago holds them all."""
    recent = accuracy(app_client, admin_headers, since=(utcnow() - timedelta(seconds=0.5)).isoformat())
    assert recent["versions"] == []
    check(accuracy(app_client, admin_headers, since=(utcnow() - timedelta(minutes=1)).isoformat()), 3600)


@pytest.mark.parametrize(
    ("path", "params", "status", "detail"),
    [
        ("nope", {}, 404, "no model 'nope'"),
        ("det", {"bucket_s": 10}, 422, None),
        ("det", {"since": "2999-01-01T00:00:00Z"}, 422, "is not in the past"),
        ("det", {"since": "2000-01-01T00:00:00Z", "bucket_s": 60}, 422, "more than 10000 buckets"),
    ],
)
def test_bad_requests(app_client, admin_headers, ctx, lab, path, params, status, detail):
    r = app_client.get(f"/api/v1/models/{path}/field-accuracy", params=params, headers=admin_headers)
    assert r.status_code == status, r.text
    if detail:
        assert detail in r.json()["detail"]
