"""Rollouts driven by the real engine over an in-memory simulated fleet (tests/helpers/fleet_sim.py)."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Deployment, DesiredRecord
from tests.helpers.fleet_sim import Behaviour, SimFleet
from tests.helpers.pki import HARDWARE, make_csr


def enroll_many(client, headers, prefix: str, n: int, tags: dict[str, str] | None = None) -> list[str]:
    token = client.post("/api/v1/enroll-tokens", json={"uses": n, "tags": tags or {}}, headers=headers).json()
    ids = []
    for i in range(n):
        csr, _ = make_csr(f"{prefix}-{i:02d}")
        r = client.post(
            "/api/v1/enroll", json={"token": token["token"], "csr_pem": csr, "hardware": HARDWARE}
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["device_id"])
    return ids


def push(client, headers, onnx_model, version: str) -> None:
    path = onnx_model(f"det-{version}.onnx", scale=float(version.split(".")[0]))
    with open(path, "rb") as fh:
        r = client.post(
            "/api/v1/models/det/versions",
            data={"version": version},
            files={"file": ("m.onnx", fh, "application/octet-stream")},
            headers=headers,
        )
    assert r.status_code == 201, r.text


def rollout_body(version: str, **over) -> dict:
    body = {
        "model": "det", "version": version, "selector": {"tags": {"site": "lab"}},
        "stages": [{"percent": 10, "soak_s": 0}, {"percent": 50, "soak_s": 0}, {"percent": 100, "soak_s": 0}],
        "gates": {"max_failure_ratio": 0.2, "max_error_rate": 0.05, "max_p95_ratio": 1.5,
                  "min_agreement": 0.9},
        "on_failure": "rollback",
    }  # fmt: skip
    body.update(over)
    return body


def drive(
    engine: RolloutEngine, fleet: SimFleet, client, headers, rollout_id: str, max_ticks: int = 60
) -> dict:
    """Tick the engine and let the fleet act until the rollout stops moving."""
    for _ in range(max_ticks):
        engine.tick()
        fleet.step()
        fleet.health()
        state = client.get(f"/api/v1/rollouts/{rollout_id}", headers=headers).json()
        if state["status"] in ("completed", "paused", "rolled_back", "aborted"):
            return state
    raise AssertionError(f"rollout did not finish: {state['status']} {state['phases']}")


def tick_racing(engine: RolloutEngine, meanwhile) -> None:
    """One engine tick in which ``meanwhile()`` (another transaction: an operator, the ingest)
    runs and commits after the tick has read the rollout and its devices, before it signs and
    writes: the race a concurrent writer can win."""
    real_notify = engine._notify

    def notify(session, rollout, rows, mode, now) -> None:
        meanwhile()
        real_notify(session, rollout, rows, mode, now)

    engine._notify = notify
    try:
        engine.tick()
    finally:
        engine._notify = real_notify


@pytest.fixture
def lab(app_client, admin_headers, ctx, onnx_model):
    return make_lab(
        app_client, admin_headers, ctx, onnx_model, ("1.0.0", "2.0.0", "3.0.0"),
        behaviours={"3.0.0": Behaviour(error_rate=0.3)},
    )


def make_lab(
    app_client,
    admin_headers,
    ctx,
    onnx_model,
    versions: tuple[str, ...] = ("1.0.0", "2.0.0"),
    *,
    behaviours: dict[str, Behaviour] | None = None,
    baseline: bool = True,
) -> SimFleet:
    """Ten simulated devices tagged site=lab serving det 1.0.0, with ``versions`` published and,
    with ``baseline``, a stored pre-rollout health baseline on 1.0.0 (the lab fixtures' setup)."""
    ids = enroll_many(app_client, admin_headers, "lab", 10, {"site": "lab"})
    for v in versions:
        push(app_client, admin_headers, onnx_model, v)
    fleet = SimFleet(ctx, ids, behaviours=behaviours)
    fleet.start(serving_version="1.0.0")
    if baseline:
        fleet.health(at_offset_s=-60)  # pre-rollout baseline on 1.0.0
    return fleet


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


def test_restarted_engine_resumes_from_the_database(app_client, admin_headers, ctx, lab, settings):
    from server.context import ServerContext

    rid = app_client.post("/api/v1/rollouts", json=rollout_body("2.0.0"), headers=admin_headers).json()["id"]
    RolloutEngine(ctx).tick()
    lab.step()
    fresh = ServerContext.open(settings)  # a new process's view of the same database and keys
    try:
        final = drive(RolloutEngine(fresh), lab, app_client, admin_headers, rid)
    finally:
        fresh.close()
    assert final["status"] == "completed"


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_two_engines_never_advance_the_same_rollout_twice(app_client, admin_headers, ctx, lab, settings):
    from server.context import ServerContext

    other = ServerContext.open(settings)
    try:
        body = rollout_body("2.0.0", stages=[{"percent": 100, "soak_s": 0}])
        rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
        engines = [RolloutEngine(ctx), RolloutEngine(other)]
        barrier = threading.Barrier(2)
        advanced = [0, 0]

        def run(i):
            for _ in range(15):
                barrier.wait()
                advanced[i] += engines[i].tick()
                if i == 0:
                    lab.step()
                    lab.health()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
        assert state["status"] == "completed", (state["reason"], state["verdict"])
        with ctx.db.session_scope() as s:
            assert set(s.scalars(sa.select(DesiredRecord.seq))) == {1}  # nobody was notified twice
        assert sum(advanced) > 0
    finally:
        other.close()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_engine_skips_a_rollout_another_server_is_advancing(app_client, admin_headers, ctx, lab, settings):
    from server.context import ServerContext
    from server.rollouts.repository import RolloutRepository

    rid = app_client.post("/api/v1/rollouts", json=rollout_body("2.0.0"), headers=admin_headers).json()["id"]
    other = ServerContext.open(settings)
    try:
        with other.db.session_scope() as s:  # the other server is in the middle of its tick
            assert RolloutRepository(s).lock_for_tick(rid, skip_locked=True) is not None
            assert RolloutEngine(ctx).tick() == 0
            with ctx.db.session_scope() as s2:
                assert s2.scalar(sa.select(sa.func.count()).select_from(DesiredRecord)) == 0
        assert RolloutEngine(ctx).tick() == 1
    finally:
        other.close()


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


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_tick_racing_an_operator_rollback_notifies_nobody(app_client, admin_headers, ctx, lab):
    """SQLite has no row locks: a tick that read a running rollout while an operator's rollback
    committed must not go on to notify the devices the rollback just cancelled (they would
    install the bad version with nothing to bring them back). The tick's write of the rollout
    row fails its version check and the whole tick rolls back."""
    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"count": 2, "soak_s": 0}, {"percent": 100, "soak_s": 0}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    for _ in range(6):  # the canaries pass, stage 2 is about to be notified
        engine.tick()
        lab.step()
        lab.health()
        state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
        if state["current_stage"] == 1:
            break
    assert state["current_stage"] == 1
    assert state["phases"] == {"succeeded": 2, "pending": 8}

    def operator_rolls_back() -> None:
        r = app_client.post(f"/api/v1/rollouts/{rid}/rollback", headers=admin_headers)
        assert r.status_code == 200, r.text

    tick_racing(engine, operator_rolls_back)
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert state["status"] == "rolling_back"
    assert state["phases"] == {"succeeded": 2, "cancelled": 8}
    with ctx.db.session_scope() as s:  # nobody got 2.0.0 after the rollback
        versions = s.scalars(sa.select(DesiredRecord.version).where(DesiredRecord.seq > 1)).all()
    assert "2.0.0" not in versions


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


def test_two_creations_for_one_model_at_once_cannot_both_pass(app_client, admin_headers, ctx, lab):
    """Two operators (or a CLI retry after a timeout) creating rollouts of one model at the same
    time: the second waits for the first to commit, then sees it and is refused."""
    from server.admin.service import CLI_PRINCIPAL
    from server.errors import Conflict
    from server.rollouts.schemas import RolloutCreate
    from server.rollouts.service import RolloutService

    created, release = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def first() -> None:
        with ctx.db.session_scope() as s:
            RolloutService(s, ctx).create(RolloutCreate.model_validate(rollout_body("2.0.0")), CLI_PRINCIPAL)
            created.set()
            release.wait(10)  # still in its transaction

    def second() -> None:
        try:
            with ctx.db.session_scope() as s:
                body = RolloutCreate.model_validate(rollout_body("3.0.0"))
                outcome["second"] = RolloutService(s, ctx).create(body, CLI_PRINCIPAL).id
        except Conflict as exc:
            outcome["second"] = exc

    a = threading.Thread(target=first)
    a.start()
    assert created.wait(10)
    b = threading.Thread(target=second)
    b.start()
    b.join(0.5)
    assert b.is_alive()  # waiting for the first creation's transaction
    release.set()
    a.join(10)
    b.join(30)
    assert isinstance(outcome["second"], Conflict), outcome
    assert len(app_client.get("/api/v1/rollouts", headers=admin_headers).json()) == 1


def test_a_state_issued_concurrently_makes_the_tick_retry(app_client, admin_headers, ctx, lab):
    """The engine signs a device's state as seq N+1 while the ingest re-signs that device's
    expiring state as N+1 too (it came back online): two states under one seq, and the device
    keeps whichever arrives first. The later writer finds the seq moved, rolls back, and the next
    tick signs N+2."""
    from datetime import timedelta

    from server.db import utcnow
    from server.devices.tables import Device
    from server.rollouts.desired import DesiredStateService

    device = sorted(lab.devices)[0]
    with ctx.db.session_scope() as s:  # the device's 1.0.0 state, about to expire
        record = DesiredStateService(s, ctx).assign(s.get(Device, device), "det", "1.0.0")
        record.expires_at = utcnow() + timedelta(minutes=1)
        first = record.seq
    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"percent": 100, "soak_s": 0}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]

    def the_device_comes_back() -> None:
        with ctx.db.session_scope() as other:  # the ingest, as the device reconnects
            assert DesiredStateService(other, ctx).resign_expiring_ids([device]) == 1

    tick_racing(engine, the_device_comes_back)  # rolled back: nobody notified
    with ctx.db.session_scope() as s:
        assert s.get(DesiredRecord, device).seq == first + 1  # the re-signed 1.0.0 state
        assert s.get(DesiredRecord, device).version == "1.0.0"
        assert not s.scalars(sa.select(Deployment).where(Deployment.phase == "notified")).all()
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    with ctx.db.session_scope() as s:
        rec = s.get(DesiredRecord, device)
        dep = s.scalars(sa.select(Deployment).where(Deployment.device_id == device)).one()
    assert (rec.version, rec.seq, dep.desired_seq) == ("2.0.0", first + 2, first + 2)


def test_a_decommission_during_a_tick_is_not_undone(app_client, admin_headers, ctx, lab):
    """A device decommissioned while a tick signs its state: the tick must not re-arm the
    cancelled deployment nor send the retired device a state (the decommission moves the device's
    seq, so the tick's seq check fails and it runs again without it)."""
    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"percent": 100, "soak_s": 0}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    retired = sorted(lab.devices)[3]

    def operator_retires_it() -> None:
        r = app_client.post(f"/api/v1/devices/{retired}/decommission", headers=admin_headers)
        assert r.status_code == 200, r.text

    tick_racing(engine, operator_retires_it)
    del lab.devices[retired]
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    assert final["phases"] == {"succeeded": 9, "cancelled": 1}
    with ctx.db.session_scope() as s:
        assert s.get(DesiredRecord, retired) is None


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_rollback_racing_a_new_state_is_refused_whole_not_partly(app_client, admin_headers, ctx, lab,
                                                                   monkeypatch):  # fmt: skip
    """A state issued for a device while an operator's rollback signs its way back (the ingest
    re-signing it, say): the rollback must not commit with that device skipped ("cannot roll
    back") and left on the bad version. It answers 409 and changes nothing; a retry works.
    (PostgreSQL: on SQLite the rollback holds the write lock by then, so nothing can race it.)"""
    from server.devices.tables import Device
    from server.rollouts import service as service_mod

    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"percent": 100, "soak_s": 3600}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    for _ in range(4):
        engine.tick()
        lab.step()
    real_assign = service_mod.DesiredStateService.assign
    raced: list[str] = []

    def assign_after_a_concurrent_state(self, device, *args, **kw):
        if not raced:  # another transaction issues this device a state first
            raced.append(device.id)
            with ctx.db.session_scope() as other:
                other.get(Device, device.id).desired_seq += 1
        return real_assign(self, device, *args, **kw)

    monkeypatch.setattr(service_mod.DesiredStateService, "assign", assign_after_a_concurrent_state)
    r = app_client.post(f"/api/v1/rollouts/{rid}/rollback", headers=admin_headers)
    assert r.status_code == 409, r.text
    assert app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()["status"] == "running"
    r = app_client.post(f"/api/v1/rollouts/{rid}/rollback", headers=admin_headers)
    assert r.status_code == 200, r.text
    for _ in range(3):
        lab.step()
        engine.tick()
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert (state["status"], state["phases"]) == ("rolled_back", {"rolled_back": 10})


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
