"""The device timeout of a rollout: a device that began updating and went quiet blocks its stage
until it times out; an operator rollback and a device back after a long absence each get the
whole timeout."""

from __future__ import annotations

import sqlalchemy as sa

from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Deployment
from tests.helpers.rollout_lab import rollout_body


def test_a_device_that_started_then_went_quiet_blocks_its_stage_until_timeout(
    app_client, admin_headers, ctx, lab
):
    """Wills fire for a whole fleet when the broker stops: an offline device that began the update
    must not let a stage pass on nobody's evidence; it blocks until it reports or times out."""
    from datetime import timedelta

    from device_client.protocol import Report
    from device_client.protocol.messages import utcnow

    engine = RolloutEngine(ctx)
    body = rollout_body(
        "2.0.0", stages=[{"count": 1, "soak_s": 0}, {"percent": 100, "soak_s": 0}], device_timeout_s=60
    )
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    engine.tick()
    with ctx.db.session_scope() as s:
        canary = s.scalars(sa.select(Deployment).where(Deployment.phase == "notified")).one()
        canary_id, seq = canary.device_id, canary.desired_seq
    dev = lab.devices[canary_id]
    lab._send(
        [
            (
                canary_id,
                "report",
                Report.build(
                    device_id=canary_id, seq=dev.next_seq(), at=utcnow(), phase="downloading", desired_seq=seq
                ).to_json(),
            )
        ]
    )
    lab.presence(canary_id, online=False)
    for _ in range(3):
        engine.tick()
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert state["status"] == "running"
    assert state["current_stage"] == 0
    assert state["soak_until"] is None  # not settled: the canary is still updating
    engine.tick(now=utcnow() + timedelta(seconds=120))  # past the device timeout
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert state["status"] == "rolling_back"
    assert "timed_out" in state["reason"]


def test_an_operator_rollback_gives_devices_the_full_timeout_to_return(app_client, admin_headers, ctx, lab):
    """The rollback clock starts at the rollback, not when the stage started: an operator rolling
    back a rollout whose last stage began long ago must not see it declared rolled back at the
    next tick with every device "unconfirmed"."""
    from datetime import timedelta

    from server.db import utcnow
    from server.rollouts.tables import Rollout

    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"percent": 100, "soak_s": 3600}], device_timeout_s=600)
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    for _ in range(4):
        engine.tick()
        lab.step()
    with ctx.db.session_scope() as s:  # the stage began two hours ago
        s.get(Rollout, rid).stage_started_at = utcnow() - timedelta(hours=2)
    assert app_client.post(f"/api/v1/rollouts/{rid}/rollback", headers=admin_headers).status_code == 200
    engine.tick()  # nobody has returned yet: still rolling back
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert state["status"] == "rolling_back"
    lab.step()
    engine.tick()
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert state["status"] == "rolled_back"
    assert state["phases"] == {"rolled_back": 10}


def test_a_device_back_after_a_long_absence_is_not_timed_out_at_once(app_client, admin_headers, ctx, lab):
    """Told while offline (its retained DesiredState waits), a device that returns after more
    than device_timeout_s gets the whole timeout from its return to make progress: the clock
    is progress-based, not counted from the notification."""
    from datetime import timedelta

    from server.db import utcnow

    away = sorted(lab.devices)[:2]
    for d in away:
        lab.presence(d, online=False)
    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"percent": 100, "soak_s": 3600}], device_timeout_s=60)
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    engine.tick()
    long_ago = utcnow() - timedelta(hours=2)
    with ctx.db.session_scope() as s:  # told two hours ago, still away
        s.execute(
            sa.update(Deployment)
            .where(Deployment.device_id.in_(away))
            .values(notified_at=long_ago, updated_at=long_ago)
        )
    for d in away:
        lab.presence(d, online=True)
    engine.tick()  # back online a moment ago: not overdue
    with ctx.db.session_scope() as s:
        phases = dict(s.execute(sa.select(Deployment.device_id, Deployment.phase)).all())
    assert {phases[d].value for d in away} == {"notified"}
    for _ in range(4):
        lab.step()
        engine.tick()
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert state["phases"] == {"succeeded": 10}
