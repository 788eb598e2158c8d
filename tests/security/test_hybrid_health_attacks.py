"""A compromised device lying to the hybrid routing gates: one device among ten claiming, with
plausible windows of five times a true device's requests, that a version escalating too much never
escalates, that one agreeing with the cloud too rarely always agrees, or the reverse of each,
changes no outcome: the rollout pauses or rolls back exactly as the honest fleet's stage says.
Windows whose routing counts cannot be true are refused at ingest. Simulated devices
(tests/helpers/fleet_sim.py) through the real ingest, judged by the real engine."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from device_client.protocol.messages import utcnow
from server.health.tables import HealthSample
from server.mqtt.handlers import REJECTED
from server.rollouts.engine import RolloutEngine
from tests.helpers.fleet_sim import WINDOW_S, Behaviour
from tests.helpers.rollout_lab import drive, make_lab, rollout_body

#: the most a lying device's window can claim and still be stored: every request, in its period
MOST = round(100_000 * WINDOW_S)
POLICY = {
    "mode": "prefer_edge",
    "confidence": {"output": "y", "softmax": True, "threshold": 0.6},
    "cloud": {"model": "det-cloud"},
}
NEVER_ESCALATES = {
    "requests": MOST, "answered_edge": MOST, "answered_cloud": 0, "escalations": 0, "escalation_rate": 0.0,
    "cloud_compared": 0, "cloud_agreement": None, "cloud_p95_ms": None,
}  # fmt: skip
ALL_ESCALATED_ALL_AGREE = {
    "requests": MOST, "answered_edge": 0, "answered_cloud": MOST, "escalations": MOST, "escalation_rate": 1.0,
    "cloud_compared": MOST, "cloud_agreement": 1.0,
}  # fmt: skip
NEVER_AGREES = {**ALL_ESCALATED_ALL_AGREE, "cloud_agreement": 0.0}


@pytest.mark.parametrize(
    ("truth", "gates", "lie", "status", "reason"),
    [
        (Behaviour(escalation_rate=0.6), {"max_escalation_rate": 0.3}, None, "paused",
         "escalation rate 0.6000 > 0.3"),
        (Behaviour(escalation_rate=0.6), {"max_escalation_rate": 0.3}, NEVER_ESCALATES, "paused",
         "escalation rate 0.6000 > 0.3"),
        (Behaviour(escalation_rate=0.1), {"max_escalation_rate": 0.3}, ALL_ESCALATED_ALL_AGREE, "completed",
         None),
        (Behaviour(escalation_rate=0.3, cloud_agreement=0.7), {"min_cloud_agreement": 0.9}, None,
         "rolled_back", "cloud agreement 0.700 < 0.9"),
        (Behaviour(escalation_rate=0.3, cloud_agreement=0.7), {"min_cloud_agreement": 0.9},
         ALL_ESCALATED_ALL_AGREE, "rolled_back", "cloud agreement 0.700 < 0.9"),
        (Behaviour(escalation_rate=0.3, cloud_agreement=0.97), {"min_cloud_agreement": 0.9}, NEVER_AGREES,
         "completed", None),
    ],
    ids=["high-escalation", "high-escalation-liar", "low-escalation-liar", "low-agreement",
         "low-agreement-liar", "high-agreement-liar"],
)  # fmt: skip
def test_one_lying_device_among_ten_changes_no_hybrid_outcome(
    app_client, admin_headers, ctx, onnx_model, truth, gates, lie, status, reason
):
    lab = make_lab(app_client, admin_headers, ctx, onnx_model, behaviours={"2.0.0": truth})
    with open(onnx_model("cloud.onnx", seed=7), "rb") as fh:
        pushed = app_client.post(
            "/api/v1/models/det-cloud/versions", data={"version": "1.0.0"},
            files={"file": ("m.onnx", fh, "application/octet-stream")}, headers=admin_headers,
        )  # fmt: skip
    assert pushed.status_code == 201, pushed.text
    if lie is not None:
        lab.lies[sorted(lab.devices)[0]] = lie
    # escalations pause the rollout for an operator; a version disagreeing with the cloud rolls back
    on_failure = "pause" if "max_escalation_rate" in gates else "rollback"
    body = rollout_body(
        "2.0.0", stages=[{"percent": 100, "soak_s": 0}], on_failure=on_failure, routing=POLICY,
        gates={"max_error_rate": None, "max_p95_ratio": None, "min_agreement": None, **gates},
    )  # fmt: skip
    r = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    final = drive(RolloutEngine(ctx), lab, app_client, admin_headers, r.json()["id"])
    assert final["status"] == status, final["reason"]
    numbers = final["verdict"]["numbers"]
    assert numbers["escalation_rate"] == pytest.approx(truth.escalation_rate)
    if "min_cloud_agreement" in gates:
        assert numbers["cloud_agreement"] == pytest.approx(truth.cloud_agreement)
    assert numbers["devices_reporting"] == 10
    if reason is not None:
        assert final["reason"] == f"stage 1 gates failed: {reason}"
    if status == "rolled_back":
        assert {d.serving["det"] for d in lab.devices.values()} == {"1.0.0"}
        assert {d.routing is None for d in lab.devices.values()} == {True}  # no policy before


def test_implausible_routing_fields_are_refused_and_counted(app_client, admin_headers, ctx, onnx_model):
    lab = make_lab(app_client, admin_headers, ctx, onnx_model, baseline=False)
    device = sorted(lab.devices)[0]
    now = utcnow()

    def send(seq: int, **claims) -> None:
        lab.window(device, seq, now + timedelta(seconds=seq), **claims)

    lies = [
        {"escalations": 11},  # more escalations than requests
        {"answered_cloud": 50},
        {"cloud_compared": 0, "cloud_agreement": 1.0},  # an agreement without comparisons
        {"cloud_compared": 5},  # comparisons without an agreement
    ]
    before = ctx.metrics.get(REJECTED, kind="health", reason="implausible_routing")
    for seq, claims in enumerate(lies, start=1):
        send(seq, **claims)
    assert ctx.metrics.get(REJECTED, kind="health", reason="implausible_routing") - before == len(lies)
    send(10, escalations=3, escalation_rate=0.3, cloud_compared=3, cloud_agreement=1.0)  # true: stored
    with ctx.db.session_scope() as s:
        stored = s.scalars(sa.select(HealthSample.seq).where(HealthSample.device_id == device)).all()
    assert stored == [10]
