"""Decommissioning devices in the middle of a rollout: their unfinished deployments are cancelled
(audited, in the decommission's transaction) and count as no failure, so retiring a few canary
devices does not pause or roll back a healthy rollout."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from device_client.protocol import Report
from device_client.protocol.messages import utcnow
from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Deployment
from tests.helpers.fleet_sim import SimFleet
from tests.helpers.rollout_lab import drive, make_lab, rollout_body


@pytest.fixture
def lab(app_client, admin_headers, ctx, onnx_model) -> SimFleet:
    """Ten simulated devices serving det 1.0.0 with a stored baseline, 2.0.0 published."""
    return make_lab(app_client, admin_headers, ctx, onnx_model)


def _phases(ctx, rid: str) -> dict[str, tuple[str, str | None]]:
    with ctx.db.session_scope() as s:
        q = sa.select(Deployment.device_id, Deployment.phase, Deployment.reason)
        rows = s.execute(q.where(Deployment.rollout_id == rid))
        return {d: (p.value, r) for d, p, r in rows}


def test_decommissioned_devices_are_cancelled_not_failed(app_client, admin_headers, ctx, lab):
    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"count": 2, "soak_s": 0}, {"percent": 100, "soak_s": 0}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    engine.tick()
    phases = _phases(ctx, rid)
    canaries = sorted(d for d, (p, _) in phases.items() if p == "notified")
    pending = sorted(d for d, (p, _) in phases.items() if p == "pending")
    assert len(canaries) == 2
    # one canary begins the update, then is retired (before, it blocked its stage until it timed
    # out, a failure); two devices of the next stage are retired before they are told (before,
    # the engine marked them failed, "not notified: decommissioned": 2 of 9 > max_failure_ratio 0.2)
    retired, dev = canaries[0], lab.devices[canaries[0]]
    with ctx.db.session_scope() as s:
        seq = s.scalars(sa.select(Deployment.desired_seq).where(Deployment.device_id == retired)).one()
    lab._send([(retired, "report", Report.build(
        device_id=retired, seq=dev.next_seq(), at=utcnow(), phase="downloading", desired_seq=seq,
    ).to_json())])  # fmt: skip
    assert _phases(ctx, rid)[retired][0] == "downloading"
    for device_id in (retired, *pending[:2]):
        r = app_client.post(f"/api/v1/devices/{device_id}/decommission", headers=admin_headers)
        assert r.status_code == 200, r.text
        del lab.devices[device_id]  # it is gone: it reports nothing more

    phases = _phases(ctx, rid)
    for device_id in (retired, *pending[:2]):
        assert phases[device_id] == ("cancelled", "device decommissioned")
    audit = app_client.get(
        f"/api/v1/audit?action=device.decommission&target_id={retired}", headers=admin_headers
    ).json()["items"]
    [cancelled] = audit[0]["details"]["cancelled_deployments"]
    assert (cancelled["rollout_id"], cancelled["phase"]) == (rid, "downloading")

    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    assert final["phases"] == {"succeeded": 7, "cancelled": 3}
    assert final["verdict"]["numbers"]["failed"] == 0


def test_decommission_leaves_finished_deployments_alone(app_client, admin_headers, ctx, lab):
    engine = RolloutEngine(ctx)
    rid = app_client.post("/api/v1/rollouts", json=rollout_body("2.0.0"), headers=admin_headers).json()["id"]
    assert drive(engine, lab, app_client, admin_headers, rid)["status"] == "completed"
    device_id = sorted(lab.devices)[0]
    r = app_client.post(f"/api/v1/devices/{device_id}/decommission", headers=admin_headers)
    assert r.status_code == 200, r.text
    assert _phases(ctx, rid)[device_id] == ("succeeded", None)
    audit = app_client.get(
        f"/api/v1/audit?action=device.decommission&target_id={device_id}", headers=admin_headers
    ).json()["items"]
    assert "cancelled_deployments" not in audit[0]["details"]


def test_a_stage_whose_devices_were_all_decommissioned_passes_empty(app_client, admin_headers, ctx, lab):
    """Cancelled deployments leave their stage: a canary stage whose every device was retired is
    an empty stage (nothing to judge), not "no device of the stage finished", a failure."""
    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"count": 2, "soak_s": 0}, {"percent": 100, "soak_s": 0}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    engine.tick()
    canaries = sorted(d for d, (p, _) in _phases(ctx, rid).items() if p == "notified")
    for device_id in canaries:
        r = app_client.post(f"/api/v1/devices/{device_id}/decommission", headers=admin_headers)
        assert r.status_code == 200, r.text
        del lab.devices[device_id]
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    assert final["phases"] == {"succeeded": 8, "cancelled": 2}
