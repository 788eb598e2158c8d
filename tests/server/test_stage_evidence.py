"""A stage is judged on evidence: at least ``min_succeeded`` devices that succeeded and reported
health, ``min_requests`` requests, reported for the new version since the stage started (not only
during its soak). Without it the stage waits up to ``stage_timeout_s``, then the rollout pauses
with the reason. Simulated devices (tests/helpers/fleet_sim.py), the real engine and API."""

from __future__ import annotations

from datetime import timedelta

import pytest

from device_client.protocol import HealthWindow
from device_client.protocol.messages import utcnow
from server.rollouts.engine import RolloutEngine
from tests.helpers.fleet_sim import SimFleet
from tests.helpers.rollout_lab import drive, make_lab, rollout_body


@pytest.fixture
def lab(app_client, admin_headers, ctx, onnx_model) -> SimFleet:
    """Ten simulated devices serving det 1.0.0 with a stored baseline, 2.0.0 published."""
    return make_lab(app_client, admin_headers, ctx, onnx_model)


def get(client, headers, rid: str) -> dict:
    r = client.get(f"/api/v1/rollouts/{rid}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def create(client, headers, **over) -> str:
    r = client.post("/api/v1/rollouts", json=rollout_body("2.0.0", **over), headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_stage_whose_devices_are_all_offline_waits_then_pauses(app_client, admin_headers, ctx, lab):
    """Its only device offline, the stage settles at once (offline devices do not block) but has
    no evidence: it waits (the reason says why), not completing with nobody updated, and pauses
    after stage_timeout_s; once the device is back, a resume completes it."""
    away = sorted(lab.devices)[0]
    lab.presence(away, online=False)
    engine = RolloutEngine(ctx)
    rid = create(
        app_client, admin_headers, selector={"device_ids": [away]}, stages=[{"percent": 100, "soak_s": 0}],
        gates={"stage_timeout_s": 60},
    )  # fmt: skip
    for _ in range(4):
        engine.tick()
    state = get(app_client, admin_headers, rid)
    assert (state["status"], state["phases"]) == ("running", {"notified": 1})
    assert state["reason"] == (
        "stage 1 waits for evidence: no device of stage 1 is online (1 offline); "
        "0 requests reported (min_requests 100)"
    )
    engine.tick(now=utcnow() + timedelta(seconds=61))
    state = get(app_client, admin_headers, rid)
    assert state["status"] == "paused"
    assert state["reason"].startswith("stage 1 has not enough evidence after stage_timeout_s (60s): ")
    assert "no device of stage 1 is online (1 offline)" in state["reason"]
    assert state["verdict"]["passed"] is False
    assert state["offline_pending"] == 1

    lab.presence(away, online=True)
    assert app_client.post(f"/api/v1/rollouts/{rid}/resume", headers=admin_headers).status_code == 200
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert (final["status"], final["phases"], final["reason"]) == ("completed", {"succeeded": 1}, None)
    assert final["verdict"]["numbers"]["succeeded_reporting"] == 1
    assert lab.devices[away].serving == {"det": "2.0.0"}


def test_the_gates_read_the_health_since_the_stage_started_not_only_the_soak(
    app_client, admin_headers, ctx, lab
):
    """The devices report while they update and not during the (short) soak: the soak alone holds
    no window ("requests: 0, error_rate: null"); the stage since it started holds them all."""
    engine = RolloutEngine(ctx)
    rid = create(app_client, admin_headers, stages=[{"percent": 100, "soak_s": 5}])
    engine.tick()  # every device told
    lab.step()
    lab.health()  # one window each, before the soak
    engine.tick()  # settled: the soak begins
    engine.tick(now=utcnow() + timedelta(seconds=6))  # ...and ends, with no window in it
    final = get(app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    numbers = final["verdict"]["numbers"]
    assert (numbers["requests"], numbers["error_rate"], numbers["p95_ms"]) == (1000, 0.0, 5.0)
    assert (numbers["succeeded_reporting"], numbers["devices_reporting"]) == (10, 10)


def test_a_stage_waits_for_min_requests(app_client, admin_headers, ctx, lab):
    engine = RolloutEngine(ctx)
    rid = create(
        app_client, admin_headers, stages=[{"percent": 100, "soak_s": 0}],
        gates={"min_requests": 1500, "stage_timeout_s": 30},
    )  # fmt: skip
    for _ in range(3):
        engine.tick()
        lab.step()
    lab.health()  # 1,000 requests: not enough
    engine.tick()
    state = get(app_client, admin_headers, rid)
    assert state["status"] == "running"
    assert state["reason"] == "stage 1 waits for evidence: 1000 requests reported (min_requests 1500)"
    lab.health()  # 2,000
    engine.tick()
    final = get(app_client, admin_headers, rid)
    assert (final["status"], final["reason"]) == ("completed", None)
    assert final["verdict"]["numbers"]["requests"] == 2000


def test_without_enough_requests_a_stage_pauses_even_on_rollback(app_client, admin_headers, ctx, lab):
    """No evidence is no evidence of harm: the rollout pauses for an operator whatever
    ``on_failure`` says."""
    engine = RolloutEngine(ctx)
    rid = create(
        app_client, admin_headers, stages=[{"percent": 100, "soak_s": 0}], on_failure="rollback",
        gates={"min_requests": 5000, "stage_timeout_s": 30},
    )  # fmt: skip
    for _ in range(3):
        engine.tick()
        lab.step()
        lab.health()
    engine.tick(now=utcnow() + timedelta(seconds=31))
    state = get(app_client, admin_headers, rid)
    assert state["status"] == "paused"
    assert state["reason"] == (
        "stage 1 has not enough evidence after stage_timeout_s (30s): "
        "3000 requests reported (min_requests 5000)"
    )
    assert {d.serving["det"] for d in lab.devices.values()} == {"2.0.0"}  # nobody sent back


def test_min_succeeded_percent_needs_that_share_of_the_stage(app_client, admin_headers, ctx, lab):
    """Offline devices do not block a stage, but ``min_succeeded_percent`` 80 of ten devices needs
    eight that succeeded and reported: with three away the stage waits; two back, it passes."""
    away = sorted(lab.devices)[:3]
    for d in away:
        lab.presence(d, online=False)
    engine = RolloutEngine(ctx)
    rid = create(
        app_client, admin_headers, stages=[{"percent": 100, "soak_s": 0}],
        gates={"min_succeeded_percent": 80, "stage_timeout_s": 600},
    )  # fmt: skip
    for _ in range(4):
        engine.tick()
        lab.step()
        lab.health()
    state = get(app_client, admin_headers, rid)
    assert state["status"] == "running"
    assert state["reason"] == (
        "stage 1 waits for evidence: "
        "7 of the 8 device(s) needed have succeeded and reported health (3 offline)"
    )
    lab.presence(away[0], online=True)
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    assert final["phases"] == {"succeeded": 8, "notified": 2}
    assert final["offline_pending"] == 2  # told; they take it when they return
    assert final["verdict"]["numbers"]["offline_waiting"] == 2


def test_a_soak_shorter_than_the_devices_health_window_is_pointed_out(app_client, admin_headers, ctx, lab):
    device = sorted(lab.devices)[0]
    window = HealthWindow.build(
        device_id=device, seq=10**9, at=utcnow() - timedelta(seconds=30), window_s=10.0, model="det",
        version="1.0.0", requests=100, errors=0, p95_ms=5.0,
    )  # fmt: skip
    lab._send([(device, "health", window.to_json())])
    body = rollout_body("2.0.0", stages=[{"percent": 50, "soak_s": 5}, {"percent": 100, "soak_s": 20}])
    created = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()
    assert created["warnings"] == [
        "the soak of stage(s) 1 (5s) is shorter than the devices' health window (10s): a stage is judged "
        "on the health its devices reported since it started, and waits after its soak until they have "
        "reported enough (up to stage_timeout_s), so it lasts at least one window"
    ]
    assert get(app_client, admin_headers, created["id"])["warnings"] == []  # advice at creation only
