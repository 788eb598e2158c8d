"""Rollouts under concurrency: a restarted engine, two engines on one database (PostgreSQL), ticks
racing an operator, the ingest or a decommission, two creations at once, a rollback racing a new
state."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Deployment, DesiredRecord
from tests.helpers.rollout_lab import drive, rollout_body


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
