"""Creating a rollout: bad bodies refused with nothing changed, a second rollout on the same
devices and a pin on a device a rollout counts on refused, stages covering the same devices merged."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import DesiredRecord
from tests.helpers.rollout_lab import drive, rollout_body


@pytest.mark.parametrize(
    ("over", "status", "message"),
    [
        ({"version": "9.9.9"}, 404, "no active version"),
        ({"model": "nope"}, 404, "no active version"),
        ({"selector": {"tags": {"site": "mars"}}}, 422, "matches no device"),
        ({"stages": [{"percent": 50}, {"percent": 50}]}, 422, "stages must grow"),
        ({"stages": [{"percent": 50}, {"count": 3}]}, 422, "stages must grow"),
        ({"stages": []}, 422, None),
        ({"stages": [{"percent": 150}]}, 422, None),
        ({"stages": [{"percent": 10, "count": 2}]}, 422, "exactly one"),
        ({"stages": [{"percent": 10}, {"percent": 50}]}, 422, "must cover them all"),
        ({"stages": [{"count": 1}]}, 422, "covers 1 of the 10 selected"),
        ({"gates": {"max_error_rate": 2}}, 422, None),
        ({"gates": {"max_failure_ratio": -0.1}}, 422, None),
        ({"on_failure": "explode"}, 422, None),
        (
            {"stages": [{"percent": 10}, {"percent": 20, "shadow": True}]},
            422,
            "shadow stages must come before",
        ),
    ],
)
def test_bad_rollouts_are_refused_without_change(app_client, admin_headers, ctx, lab, over, status, message):
    r = app_client.post("/api/v1/rollouts", json={**rollout_body("2.0.0"), **over}, headers=admin_headers)
    assert r.status_code == status, r.text
    if message:
        assert message in str(r.json()["detail"])
    assert app_client.get("/api/v1/rollouts", headers=admin_headers).json() == []


def test_second_rollout_on_same_devices_is_refused(app_client, admin_headers, lab):
    assert (
        app_client.post("/api/v1/rollouts", json=rollout_body("2.0.0"), headers=admin_headers).status_code
        == 201
    )
    r = app_client.post("/api/v1/rollouts", json=rollout_body("3.0.0"), headers=admin_headers)
    assert r.status_code == 409
    assert "already in rollout" in r.json()["detail"]


def test_pinning_a_device_that_a_rollout_counts_on_is_refused(app_client, admin_headers, ctx, lab):
    """PUT /devices/{id}/desired on a device in an active rollout of that model is a 409 that
    changes nothing; once the rollout has finished, or for a device the rollout cancelled, the
    pin goes through."""
    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"count": 1, "soak_s": 0}, {"percent": 100, "soak_s": 0}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    engine.tick()
    device = sorted(lab.devices)[0]
    with ctx.db.session_scope() as s:
        before = s.scalar(sa.select(sa.func.count()).select_from(DesiredRecord))
    r = app_client.put(f"/api/v1/devices/{device}/desired", json={"model": "det", "version": "3.0.0"},
                       headers=admin_headers)  # fmt: skip
    assert r.status_code == 409, r.text
    assert f"is in rollout {rid}" in r.json()["detail"]
    with ctx.db.session_scope() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(DesiredRecord)) == before
    assert drive(engine, lab, app_client, admin_headers, rid)["status"] == "completed"
    r = app_client.put(f"/api/v1/devices/{device}/desired", json={"model": "det", "version": "3.0.0"},
                       headers=admin_headers)  # fmt: skip
    assert r.status_code == 200, r.text


def test_percent_stages_that_cover_the_same_devices_are_merged(app_client, admin_headers, ctx, lab):
    """1% and 10% of 10 devices are both 1 device: one stage (the later one's soak), not a 422."""
    stages = [{"percent": 1, "soak_s": 5}, {"percent": 10, "soak_s": 0},
              {"percent": 50, "soak_s": 0}, {"percent": 100, "soak_s": 0}]  # fmt: skip
    r = app_client.post("/api/v1/rollouts", json=rollout_body("2.0.0", stages=stages), headers=admin_headers)
    assert r.status_code == 201, r.text
    created = r.json()
    assert [s["percent"] for s in created["stages"]] == [10, 50, 100]
    assert [v["devices"] for v in created["stage_views"]] == [1, 5, 10]
    assert created["stage_views"][0]["soak_s"] == 0
    audit = app_client.get("/api/v1/audit?limit=50", headers=admin_headers).json()["items"]
    entry = next(e for e in audit if e["action"] == "rollout.create")
    assert [s["percent"] for s in entry["details"]["stages_requested"]] == [1, 10, 50, 100]
    final = drive(RolloutEngine(ctx), lab, app_client, admin_headers, created["id"])
    assert final["status"] == "completed", final["reason"]
    assert final["phases"] == {"succeeded": 10}


def test_the_default_cli_stages_run_on_a_single_device(app_client, admin_headers, ctx, lab):
    """The quick start: the CLI's default 1,10,50,100 on one device is one stage of 100%."""
    device = sorted(lab.devices)[0]
    stages = [{"percent": p, "soak_s": 0} for p in (1, 10, 50, 100)]
    body = rollout_body("2.0.0", stages=stages, selector={"device_ids": [device]})
    r = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    assert [s["percent"] for s in r.json()["stages"]] == [100]
    final = drive(RolloutEngine(ctx), lab, app_client, admin_headers, r.json()["id"])
    assert (final["status"], final["phases"]) == ("completed", {"succeeded": 1})
    assert lab.devices[device].serving == {"det": "2.0.0"}
