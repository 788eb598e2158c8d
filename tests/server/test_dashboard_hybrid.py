"""The hybrid routing numbers of a rollout's health series (``GET /api/v1/rollouts/{id}/health``
and the dashboard's chart data): escalation rate weighted by the requests of windows under a
routing policy, cloud agreement by the edge answers compared with the cloud's, per point and in
the baseline, from real windows through the real ingest (simulated ``lab`` devices)."""

from __future__ import annotations

import pytest

from server.rollouts.engine import RolloutEngine
from tests.helpers.dashboard import signed_in
from tests.helpers.fleet_sim import Behaviour
from tests.helpers.rollout_lab import drive, rollout_body

#: one window of lab-00 on 2.0.0: 400 requests, half escalated and compared, half of those agreeing
LIE = {
    "requests": 400, "answered_edge": 200, "answered_cloud": 200, "escalations": 200,
    "escalation_rate": 0.5, "cloud_compared": 200, "cloud_agreement": 0.5,
}  # fmt: skip


def test_series_carry_escalation_rate_and_cloud_agreement(app_client, admin_headers, make_token, ctx, lab):
    # 100 requests a window: 1.0.0 escalates 10 (9 of them agree), 2.0.0 escalates 30 (24 agree)
    lab.behaviours["1.0.0"] = Behaviour(escalation_rate=0.1, cloud_agreement=0.9)
    lab.behaviours["2.0.0"] = Behaviour(escalation_rate=0.3, cloud_agreement=0.8)
    lab.health()  # a baseline under a routing policy (the lab's first baseline had none)
    r = app_client.post("/api/v1/rollouts", json=rollout_body("2.0.0"), headers=admin_headers)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert drive(RolloutEngine(ctx), lab, app_client, admin_headers, rid)["status"] == "completed"
    lab.lies["lab-00"] = LIE
    lab.health()

    body = app_client.get(f"/api/v1/rollouts/{rid}/health", headers=admin_headers).json()
    assert body["baseline"]["escalation_rate"] == pytest.approx(0.1)
    assert body["baseline"]["cloud_agreement"] == pytest.approx(0.9)
    series = {(s["version"], s["mode"]): s["points"] for s in body["series"]}

    old = [p for p in series[("1.0.0", "serve")] if p["routed_requests"]]
    assert old
    for p in old:
        assert p["escalation_rate"] == pytest.approx(0.1)
        assert p["cloud_agreement"] == pytest.approx(0.9)
        assert p["cloud_compared"] * 10 == p["routed_requests"]

    lies = 0
    for p in series[("2.0.0", "serve")]:
        lied = p["cloud_compared"] * 10 != p["requests"] * 3  # the bucket holds lab-00's window
        lies += lied
        honest = (p["requests"] - 400 * lied) // 100  # 100-request windows escalating 30
        escalated = 30 * honest + 200 * lied
        assert p["routed_requests"] == p["requests"]
        assert p["cloud_compared"] == escalated
        assert p["escalation_rate"] == pytest.approx(escalated / p["requests"])
        agreed = 0.8 * 30 * honest + 0.5 * 200 * lied
        assert p["cloud_agreement"] == pytest.approx(agreed / escalated)
    assert lies == 1

    signed_in(app_client, make_token("viewer"))
    assert app_client.get(f"/ui/rollouts/{rid}/health.json").json() == body
    page = app_client.get(f"/ui/rollouts/{rid}").text
    assert 'data-metric="escalation_rate"' in page
    assert 'data-metric="cloud_agreement"' in page
    live = app_client.get(f"/ui/rollouts/{rid}/live").text  # the stage table's hybrid columns
    baseline = live.split('class="baseline"')[1]
    assert '<td class="num" data-col="escalation_rate">10.0%</td>' in baseline
    assert '<td class="num" data-col="cloud_agreement">0.900</td>' in baseline
    assert '<td class="num" data-col="escalation_rate">30.0%</td>' in live.split('class="baseline"')[0]


def test_series_without_a_routing_policy_have_no_hybrid_numbers(
    app_client, admin_headers, make_token, ctx, lab
):
    r = app_client.post("/api/v1/rollouts", json=rollout_body("2.0.0"), headers=admin_headers)
    rid = r.json()["id"]
    drive(RolloutEngine(ctx), lab, app_client, admin_headers, rid)
    body = app_client.get(f"/api/v1/rollouts/{rid}/health", headers=admin_headers).json()
    assert body["baseline"]["escalation_rate"] is None
    assert body["baseline"]["cloud_agreement"] is None
    points = [p for s in body["series"] for p in s["points"]]
    assert points
    assert all(p["escalation_rate"] is None and p["cloud_agreement"] is None for p in points)
    assert all(p["routed_requests"] == 0 and p["cloud_compared"] == 0 for p in points)
    signed_in(app_client, make_token("viewer"))
    assert "escalated" not in app_client.get(f"/ui/rollouts/{rid}/live").text
