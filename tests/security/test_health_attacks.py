"""A compromised device lying to the rollout gates: impossible health windows are refused at
ingest (counted per reason), one lying device among ten changes neither a good nor a bad stage's
outcome, and what a report says in ``details`` cannot overwrite the server's bookkeeping of its
deployment. The devices are simulated (tests/helpers/fleet_sim.py) through the server's real
ingest path, judged by the real engine."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from device_client.protocol import HealthWindow
from device_client.protocol.messages import utcnow
from server.health.tables import HealthSample
from server.mqtt.handlers import REJECTED
from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Deployment, DesiredRecord
from tests.helpers.fleet_sim import WINDOW_S, Behaviour
from tests.helpers.rollout_lab import drive, make_lab, rollout_body


def stored(ctx, device_id: str) -> list[int]:
    with ctx.db.session_scope() as s:
        q = sa.select(HealthSample.seq).where(HealthSample.device_id == device_id).order_by(HealthSample.seq)
        return list(s.scalars(q))


def test_impossible_health_windows_are_refused_and_counted(app_client, admin_headers, ctx, onnx_model):
    lab = make_lab(app_client, admin_headers, ctx, onnx_model, baseline=False)
    liar = sorted(lab.devices)[0]
    now = utcnow()

    def send(seq: int, **claims) -> None:
        fields = {"device_id": liar, "seq": seq, "at": now, "window_s": 10.0, "model": "det",
                  "version": "1.0.0", "requests": 100, "errors": 0, "p95_ms": 5.0, **claims}  # fmt: skip
        lab._send([(liar, "health", HealthWindow.build(**fields).to_json())])

    send(1, at=now - timedelta(seconds=10))  # a true window: stored
    attacks = {
        "implausible_rate": {"requests": 2**31 - 1},  # two billion clean requests in 10 s
        "implausible_errors": {"requests": 10, "errors": 2**31 - 1},
        "overlapping_window": {"at": now - timedelta(seconds=5)},  # half of seq 1's period again
        "implausible_window": {"window_s": 30 * 86400.0, "requests": 0},  # a month "in one window"
        "clock_skew": {"at": now + timedelta(days=1)},  # a period not yet begun
    }
    for seq, (reason, claims) in enumerate(attacks.items(), start=2):
        before = ctx.metrics.get(REJECTED, kind="health", reason=reason)
        send(seq, **claims)
        assert ctx.metrics.get(REJECTED, kind="health", reason=reason) - before == 1, reason
    assert stored(ctx, liar) == [1]
    metrics = app_client.get("/metrics").text
    assert 'fleet_mqtt_rejected_total{kind="health",reason="implausible_rate"} 1' in metrics
    send(99)  # the next true period is stored: the device is not shut out
    assert stored(ctx, liar) == [1, 99]


#: the most a lying device's window can claim and still be stored: every request, in its period
MOST = round(100_000 * WINDOW_S)


@pytest.mark.parametrize(
    ("truth", "lie", "status", "reason"),
    [
        # a good version that one canary paints as broken and slow
        (Behaviour(), {"requests": MOST, "errors": MOST, "p95_ms": 1000.0}, "completed", None),
        # a bad version (6% errors > 5%) that one canary paints as perfect
        (Behaviour(error_rate=0.06), {"requests": MOST, "errors": 0, "p95_ms": 0.5}, "paused", "error rate"),
    ],
    ids=["good-stage", "bad-stage"],
)
def test_one_lying_device_among_ten_changes_neither_outcome(
    app_client, admin_headers, ctx, onnx_model, truth, lie, status, reason
):
    """Request-weighted, the liar's windows (five times a true device's requests, each one
    plausible) would decide both stages: 36% errors on the good one, 3.9% on the bad one. Judged
    per device with the extremes dropped, each stage reads as its nine honest devices."""
    lab = make_lab(app_client, admin_headers, ctx, onnx_model, behaviours={"2.0.0": truth})
    liar = sorted(lab.devices)[0]
    lab.lies[liar] = lie
    body = rollout_body("2.0.0", stages=[{"percent": 100, "soak_s": 0}], on_failure="pause")
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    final = drive(RolloutEngine(ctx), lab, app_client, admin_headers, rid)
    assert final["status"] == status, final["reason"]
    numbers = final["verdict"]["numbers"]
    assert numbers["error_rate"] == pytest.approx(truth.error_rate)
    assert numbers["p95_ms"] == pytest.approx(truth.p95_ms)
    assert numbers["devices_reporting"] == 10
    assert numbers["requests_reported"] > numbers["requests"]  # the liar counted as a typical device
    if reason is not None:
        assert final["reason"] == f"stage 1 gates failed: error rate {truth.error_rate:.4f} > 0.05"


def test_a_report_cannot_rewrite_its_deployment_bookkeeping(app_client, admin_headers, ctx, onnx_model):
    """A shadow canary whose reports claim ``mode: serve`` (and a ``resigned_from`` seq) must still
    be switched to serving by the serving stage: the server's keys are its own, the device's
    ``details`` live under ``details["device"]``."""
    lab = make_lab(app_client, admin_headers, ctx, onnx_model)
    engine = RolloutEngine(ctx)
    stages = [{"count": 1, "soak_s": 0, "shadow": True}, {"percent": 100, "soak_s": 0}]
    body = rollout_body("2.0.0", stages=stages, on_failure="pause")
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    engine.tick()
    with ctx.db.session_scope() as s:
        canary = s.scalars(sa.select(Deployment.device_id).where(Deployment.phase == "notified")).one()
    claims = {"mode": "serve", "resigned_from": [99]}
    lab.report_details[canary] = claims
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    assert {d.serving["det"] for d in lab.devices.values()} == {"2.0.0"}  # the canary too
    with ctx.db.session_scope() as s:
        dep = s.scalars(sa.select(Deployment).where(Deployment.device_id == canary)).one()
        record = s.get(DesiredRecord, canary)
        assert (record.seq, record.mode) == (2, "serve")  # told to shadow, then to serve
        assert dep.details["mode"] == "serve"  # set by the engine's re-arm, not by the claim
        assert "resigned_from" not in dep.details
        assert dep.details["device"] == claims
