"""Re-signed DesiredStates during a rollout: a device still working on the state it took before the
re-sign, and canaries that gave a version up reconnecting near their state's expiry."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Deployment, DesiredRecord
from tests.helpers.fleet_sim import Behaviour
from tests.helpers.rollout_lab import drive, rollout_body


def test_a_device_working_on_a_state_that_was_resigned_is_still_tracked(app_client, admin_headers, ctx, lab):
    """A device took its DesiredState, went away mid-update and came back as the state neared
    expiry: the server re-signs it under a new seq (for devices that never took it) and the
    deployment follows the new seq, yet this device goes on reporting under the old one; those
    reports must still move the deployment, and the rollout completes."""
    from datetime import timedelta

    from device_client.protocol import Report
    from device_client.protocol.messages import utcnow

    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"count": 1, "soak_s": 0}, {"percent": 100, "soak_s": 0}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    engine.tick()
    with ctx.db.session_scope() as s:
        dep = s.scalars(sa.select(Deployment).where(Deployment.phase == "notified")).one()
        device, old = dep.device_id, dep.desired_seq
    dev = lab.devices[device]

    def report(phase: str) -> None:
        msg = Report.build(
            device_id=device, seq=dev.next_seq(), at=utcnow(), phase=phase, desired_seq=old, rollout_id=rid
        )
        lab._send([(device, "report", msg.to_json())])

    report("downloading")
    lab.presence(device, online=False)
    with ctx.db.session_scope() as s:  # away until its state is about to expire
        s.execute(sa.update(DesiredRecord).values(expires_at=utcnow() + timedelta(minutes=5)))
    lab.presence(device, online=True)
    with ctx.db.session_scope() as s:
        dep = s.scalars(sa.select(Deployment).where(Deployment.device_id == device)).one()
        assert dep.desired_seq == old + 1  # re-signed, and the deployment follows
        assert dep.details["resigned_from"] == [old]
    for phase in ("verifying", "installing", "probation", "succeeded"):
        report(phase)
    with ctx.db.session_scope() as s:
        phase = s.scalar(sa.select(Deployment.phase).where(Deployment.device_id == device))
    assert phase.value == "succeeded"
    dev.serving = {"det": "2.0.0"}
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    assert final["phases"] == {"succeeded": 10}


def near_expiry_and_back(ctx, lab, device_ids: list[str]) -> None:
    """The devices' DesiredStates are about to expire as the devices reconnect: the ingest re-signs
    what is to be re-signed (resign_expiring_ids)."""
    from datetime import timedelta

    from device_client.protocol.messages import utcnow

    with ctx.db.session_scope() as s:
        s.execute(sa.update(DesiredRecord).values(expires_at=utcnow() + timedelta(minutes=5)))
    for d in device_ids:
        lab.presence(d, online=False)
        lab.presence(d, online=True)


def desired_of(ctx) -> dict[str, tuple[int, str, str | None]]:
    with ctx.db.session_scope() as s:
        return {r.device_id: (r.seq, r.version, r.rollout_id) for r in s.scalars(sa.select(DesiredRecord))}


def test_a_rollback_also_sends_back_canaries_that_reverted_on_their_own(app_client, admin_headers, ctx, lab):
    """The canaries revert in probation (deployment rolled_back) and the stage trips the automatic
    rollback: their DesiredStates, which still named the bad version, now name the previous one,
    so a re-sign when they reconnect near expiry cannot put them back on the bad version. The
    devices never told of it get nothing."""
    lab.behaviours["3.0.0"] = Behaviour(reverts=True)
    engine = RolloutEngine(ctx)
    body = rollout_body("3.0.0", stages=[{"count": 2, "soak_s": 0}, {"percent": 100, "soak_s": 0}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "rolled_back"
    assert final["phases"] == {"rolled_back": 2, "cancelled": 8}
    desired = desired_of(ctx)
    assert len(desired) == 2  # only the canaries were ever told anything
    assert {(v, r) for _, v, r in desired.values()} == {("1.0.0", rid)}
    lab.step()
    near_expiry_and_back(ctx, lab, sorted(desired))
    resigned = desired_of(ctx)
    assert {d: (v, r) for d, (_, v, r) in resigned.items()} == dict.fromkeys(desired, ("1.0.0", rid))
    assert all(resigned[d][0] == desired[d][0] + 1 for d in desired)  # re-signed, still the way back
    assert lab.step() == 2
    assert {d.serving["det"] for d in lab.devices.values()} == {"1.0.0"}


@pytest.mark.parametrize("behaviour", [Behaviour(reverts=True), Behaviour(install_fails=True)])
def test_a_version_a_device_gave_up_is_not_resigned_and_an_operator_rollback_replaces_it(
    app_client, admin_headers, ctx, lab, behaviour
):
    """A canary that reverted in probation, or whose install failed, still holds the DesiredState
    naming the bad version while the rollout is paused. Reconnecting near its expiry must not get
    it re-signed (a new seq the device would install again); an operator rollback then replaces it
    with the previous version."""
    lab.behaviours["3.0.0"] = behaviour
    engine = RolloutEngine(ctx)
    body = rollout_body(
        "3.0.0", stages=[{"count": 2, "soak_s": 0}, {"percent": 100, "soak_s": 0}], on_failure="pause"
    )
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "paused"
    canaries = desired_of(ctx)
    assert {(v, r) for _, v, r in canaries.values()} == {("3.0.0", rid)}
    assert len(canaries) == 2
    near_expiry_and_back(ctx, lab, sorted(canaries))
    assert desired_of(ctx) == canaries  # left to expire, not re-signed
    assert lab.step() == 0  # nothing new to install
    r = app_client.post(f"/api/v1/rollouts/{rid}/rollback", headers=admin_headers)
    assert r.status_code == 200, r.text
    back = desired_of(ctx)
    assert back == {
        d: (s + 1, "1.0.0", rid) for d, (s, _, _) in canaries.items()
    }
    assert lab.step() == 2
    engine.tick()
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert state["status"] == "rolled_back"
    gave_up = "rolled_back" if behaviour.reverts else "failed"
    assert state["phases"] == {gave_up: 2, "cancelled": 8}
    assert {d.serving["det"] for d in lab.devices.values()} == {"1.0.0"}
