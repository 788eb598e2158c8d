"""kill -9 of the server process mid-rollout: the restarted server resumes from the database.

The server runs as ``python -m server.cli server run`` against a Mosquitto that outlives it, four
real daemons (in this process) take part in a two-stage rollout, and the server is SIGKILLed twice:

1. in the middle of stage 1, while its devices are on probation (their outcomes arrive while no
   server is connected: the broker keeps them for the server's persistent session);
2. right after the promotion committed stage 2's DesiredStates to the outbox and before any was
   published: the broker is frozen (SIGSTOP) during the soak, so the publisher waits for PUBACKs
   that never come, and the kill lands with those rows committed and unpublished.

The rollout must complete, every outbox row must end published, each device must hold the
DesiredState the database holds for it, and no device may have been told twice: one desired seq
per device in the whole outbox, and that is the seq its reports and its deployment name.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from server.db import Database
from server.rollouts.tables import Deployment, DesiredRecord, OutboxMessage, Rollout
from tests.helpers.chaos_rig import Fleet, ServerProcess, chaos_rollout, server_settings
from tests.helpers.device_fleet import wait_for
from tests.helpers.onnx_models import make_model
from tests.helpers.tokens import create_admin_token

pytestmark = pytest.mark.mqtt

IDS = [f"edge-s{i}" for i in range(4)]


class _Ctx:
    def __init__(self, db: Database) -> None:
        self.db = db


def test_server_kill9_mid_rollout_resumes_from_the_database(tmp_path: Path) -> None:
    from server.runner import start_embedded_broker

    settings = server_settings(tmp_path)
    broker = start_embedded_broker(settings)  # writes the fleet CA the server will use too
    server = ServerProcess(settings, tmp_path / "server.log")
    fleet: Fleet | None = None
    db: Database | None = None
    try:
        server.start()
        db = Database(settings.database_url)
        token = create_admin_token(_Ctx(db), "admin")
        fleet = Fleet(server.url, token, db, tmp_path / "devices", IDS)
        fleet.client.push_model("clf", "1.0.0", make_model(tmp_path / "m1.onnx"))
        fleet.start()
        body = chaos_rollout(
            "1.0.0",
            [{"count": 2, "soak_s": 2}, {"percent": 100, "soak_s": 0}],
            probation={"seconds": 2.5, "min_requests": 0},
        )
        rollout_id = fleet.client.create_rollout(body)["id"]

        def stage_phases(stage: int) -> list[str]:
            return [p for s, p in fleet.deployments(rollout_id).values() if s == stage]

        # 1. mid-stage: the canaries are on probation
        wait_for(
            lambda: stage_phases(0) and set(stage_phases(0)) == {"probation"},
            timeout=30,
            what="stage 1 on probation",
        )
        server.kill9()
        server.start()

        # 2. between the commit of stage 2's DesiredStates and their publication
        def soaking() -> bool:
            with db.session_scope() as s:
                soak_until = s.scalar(sa.select(Rollout.soak_until).where(Rollout.id == rollout_id))
            return soak_until is not None and set(stage_phases(0)) == {"succeeded"}

        wait_for(soaking, timeout=30, what="stage 1 settled and soaking")
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(
                lambda: stage_phases(1) and set(stage_phases(1)) == {"notified"},
                timeout=30,
                what="stage 2 notified in the database",
            )
            unpublished = pending_outbox(db)
            assert unpublished, "stage 2's DesiredStates should wait in the outbox (broker frozen)"
            server.kill9()
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        server.start()

        # the rollout resumes where the database says it is, and completes
        deadline = time.monotonic() + 60
        state = fleet.client.get_rollout(rollout_id)
        while state["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            state = fleet.client.get_rollout(rollout_id)
        assert state["status"] == "completed", (
            state["status"],
            state["reason"],
            fleet.deployments(rollout_id),
        )
        assert set(stage_phases(0) + stage_phases(1)) == {"succeeded"}

        # the outbox lost nothing: every committed row was published (those of the kill included)
        wait_for(lambda: not pending_outbox(db), timeout=20, what="outbox drained")
        told = desired_seqs_published(db)
        with db.session_scope() as s:
            records = {r.device_id: r.seq for r in s.scalars(sa.select(DesiredRecord))}
            deps = {
                d.device_id: d.desired_seq
                for d in s.scalars(sa.select(Deployment).where(Deployment.rollout_id == rollout_id))
            }
        assert set(unpublished) <= {row_id for row_id, _, _ in told}
        for d in IDS:
            # told exactly once: one desired seq ever published to the device
            seqs = {seq for _, device, seq in told if device == d}
            assert seqs == {records[d]}, (d, seqs, records[d])
            assert deps[d] == records[d]
            # the device holds what the database holds, and serves it
            daemon = fleet.daemons[d]
            assert daemon.state.last_desired_seq == records[d]
            assert daemon.state.serving() == {"clf": "1.0.0"}
            reported = {e for e in fleet.event_desired_seqs(d) if e is not None}
            assert reported == {records[d]}, (d, reported)
    finally:
        if fleet is not None:
            fleet.stop()
        server.terminate()
        broker.stop()
        if db is not None:
            db.dispose()


def pending_outbox(db: Database) -> list[int]:
    with db.session_scope() as s:
        return list(s.scalars(sa.select(OutboxMessage.id).where(OutboxMessage.published_at.is_(None))))


def desired_seqs_published(db: Database) -> list[tuple[int, str, int]]:
    """(row id, device id, desired seq) of every DesiredState the outbox ever held."""
    out = []
    with db.session_scope() as s:
        for row in s.scalars(sa.select(OutboxMessage).order_by(OutboxMessage.id)):
            parts = row.topic.split("/")
            if parts[-1] != "desired":
                continue
            signed = json.loads(bytes(row.payload))["signed"]
            out.append((row.id, parts[3], int(signed["seq"])))
    return out
