"""Rollouts driven by the real engine over an in-memory simulated fleet (tests/helpers/fleet_sim.py,
the ``lab`` of tests/server/conftest.py): stages, gates (failures, error rate, shadow agreement),
offline devices, download concurrency and operator actions."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Deployment, DesiredRecord
from tests.helpers.fleet_sim import Behaviour
from tests.helpers.rollout_lab import drive, rollout_body


def test_rollout_completes_in_stages(app_client, admin_headers, ctx, lab):
    r = app_client.post("/api/v1/rollouts", json=rollout_body("2.0.0"), headers=admin_headers)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["status"] == "running"
    assert created["devices"] == 10
    assert [v["devices"] for v in created["stage_views"]] == [1, 5, 10]

    engine = RolloutEngine(ctx)
    engine.tick()
    with ctx.db.session_scope() as s:  # only the canary has been told
        assert s.scalar(sa.select(sa.func.count()).select_from(DesiredRecord)) == 1
    final = drive(engine, lab, app_client, admin_headers, created["id"])
    assert final["status"] == "completed", final["reason"]
    assert final["phases"] == {"succeeded": 10}
    assert all(d.serving == {"det": "2.0.0"} for d in lab.devices.values())
    with ctx.db.session_scope() as s:  # each device was told exactly once
        assert set(s.scalars(sa.select(DesiredRecord.seq))) == {1}
    actions = [
        e["action"] for e in app_client.get("/api/v1/audit?limit=50", headers=admin_headers).json()["items"]
    ]
    assert {"rollout.create", "rollout.start", "rollout.promote", "rollout.complete"} <= set(actions)


def test_bad_version_trips_canary_and_rolls_back(app_client, admin_headers, ctx, lab):
    engine = RolloutEngine(ctx)
    first = app_client.post("/api/v1/rollouts", json=rollout_body("2.0.0"), headers=admin_headers).json()
    assert drive(engine, lab, app_client, admin_headers, first["id"])["status"] == "completed"
    lab.health(at_offset_s=1)  # baseline of 2.0.0 before the next rollout
    bad = app_client.post("/api/v1/rollouts", json=rollout_body("3.0.0"), headers=admin_headers).json()
    final = drive(engine, lab, app_client, admin_headers, bad["id"])
    assert final["status"] == "rolled_back"
    assert "error rate" in final["reason"]
    assert final["verdict"]["numbers"]["error_rate"] == pytest.approx(0.3)
    with ctx.db.session_scope() as s:  # the way back is not judged on probation (it could bounce)
        back = s.scalars(sa.select(DesiredRecord).where(DesiredRecord.version == "2.0.0")).all()
        assert [r.probation["seconds"] for r in back if r.rollout_id == bad["id"]] == [0.0]
    # the canary went back to 2.0.0, every other device was never touched
    assert {d.serving["det"] for d in lab.devices.values()} == {"2.0.0"}
    assert final["phases"] == {"rolled_back": 1, "cancelled": 9}


def test_failure_pauses_when_asked_and_operator_actions(app_client, admin_headers, ctx, lab):
    lab.behaviours["2.0.0"] = Behaviour(install_fails=True)
    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", on_failure="pause")
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "paused"
    assert "failed" in final["reason"]
    r = app_client.post(f"/api/v1/rollouts/{rid}/promote", headers=admin_headers)
    assert r.status_code == 409
    assert (
        app_client.post(f"/api/v1/rollouts/{rid}/resume", headers=admin_headers).json()["status"] == "running"
    )
    assert (
        app_client.post(f"/api/v1/rollouts/{rid}/abort", headers=admin_headers).json()["status"] == "aborted"
    )
    r = app_client.post(f"/api/v1/rollouts/{rid}/resume", headers=admin_headers)
    assert r.status_code == 409
    assert "aborted" in r.json()["detail"]


def test_offline_devices_do_not_block_and_catch_up(app_client, admin_headers, ctx, lab):
    offline = sorted(lab.devices)[:3]
    for d in offline:
        lab.presence(d, online=False)
    engine = RolloutEngine(ctx)
    # a canary stage of 5: whichever devices it draws, some are online to give it evidence (a stage
    # whose devices are all offline waits for them: tests/server/test_stage_evidence.py)
    body = rollout_body("2.0.0", stages=[{"percent": 50, "soak_s": 0}, {"percent": 100, "soak_s": 0}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "completed"
    assert final["phases"]["succeeded"] == 7
    with ctx.db.session_scope() as s:  # the offline ones were told too: their retained state waits
        assert s.scalar(sa.select(sa.func.count()).select_from(DesiredRecord)) == 10
    for d in offline:
        lab.presence(d, online=True)
    lab.step()
    assert all(lab.devices[d].serving == {"det": "2.0.0"} for d in offline)


def test_concurrency_limit_and_operator_rollback(app_client, admin_headers, ctx, lab):
    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"percent": 100, "soak_s": 3600}], max_concurrent_downloads=3)
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    engine.tick()
    with ctx.db.session_scope() as s:
        phases = s.scalars(sa.select(Deployment.phase)).all()
    assert sorted(p.value for p in phases).count("notified") == 3
    for _ in range(6):
        lab.step()
        engine.tick()
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert state["phases"] == {"succeeded": 10}
    assert state["status"] == "running"  # soaking for an hour
    assert state["soak_until"] is not None
    r = app_client.post(f"/api/v1/rollouts/{rid}/rollback", headers=admin_headers)
    assert r.json()["status"] == "rolling_back"
    for _ in range(3):
        lab.step()
        engine.tick()
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert state["status"] == "rolled_back"
    assert {d.serving["det"] for d in lab.devices.values()} == {"1.0.0"}


def test_shadow_stage_gates_on_agreement(app_client, admin_headers, ctx, lab):
    lab.behaviours["2.0.0"] = Behaviour(agreement=0.5)
    engine = RolloutEngine(ctx)
    body = rollout_body(
        "2.0.0",
        stages=[{"percent": 30, "soak_s": 0, "shadow": True}, {"percent": 100, "soak_s": 0}],
        on_failure="pause",
    )
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "paused"
    assert "shadow agreement 0.500 < 0.9" in final["reason"]
    # shadowing never changed what devices serve
    assert {d.serving["det"] for d in lab.devices.values()} == {"1.0.0"}

    lab.behaviours["2.0.0"] = Behaviour(agreement=0.99)
    app_client.post(f"/api/v1/rollouts/{rid}/resume", headers=admin_headers)
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    assert {d.serving["det"] for d in lab.devices.values()} == {"2.0.0"}
