"""Replicas sharing the MQTT subscription each receive some of one device's reports. Their ingest
batches must not overwrite each other (a lost update left devices stuck mid-update in a
10,000-device fan-out over two replicas): on PostgreSQL a batch locks its devices' rows before
reading ``last_report_seq`` and the deployment phases.

The race is made deterministic: batch A (the device's later reports) is written in an open
transaction; batch B (its earlier reports, delivered to the other replica) starts in another
thread and must wait for A's locks (seen in ``pg_stat_activity``) before A commits. Without the
lock B reads the state from before A, and its commit turns the finished deployment back to
``verifying``.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from device_client.protocol import Report
from server.devices.tables import Device
from server.mqtt.handlers import IngestWorker
from server.rollouts.tables import Deployment
from tests.helpers.device_rows import notified_devices

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


def _reports(device_id: str, phases: list[tuple[int, str]]) -> list[tuple[str, bytes, datetime]]:
    now = datetime.now(UTC)
    out = []
    for seq, phase in phases:
        report = Report.build(
            device_id=device_id, seq=seq, at=now, phase=phase, desired_seq=1, model="det",
            version="2.0.0", serving={"det": "2.0.0" if phase == "succeeded" else "1.0.0"},
        )  # fmt: skip
        out.append((f"fleet/v1/d/{device_id}/report", report.to_json(), now))
    return out


def _lock_waiters(ctx) -> int:
    with ctx.db.engine.connect() as c:
        return int(
            c.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            )
        )


def test_two_replicas_batches_for_one_device_do_not_lose_updates(ctx):
    (device,) = notified_devices(ctx, "race", 1)
    worker_a, worker_b = IngestWorker(ctx, ctx.metrics), IngestWorker(ctx, ctx.metrics)
    later = worker_a.parse(_reports(device, [(3, "installing"), (4, "probation"), (5, "succeeded")]))
    earlier = _reports(device, [(1, "downloading"), (2, "verifying")])

    with ctx.db.session_scope() as session_a:
        worker_a.write(session_a, later)  # replica A: written, not yet committed
        b = threading.Thread(target=worker_b.process, args=(earlier,), name="replica-b")
        b.start()
        deadline = time.monotonic() + 30
        while _lock_waiters(ctx) == 0:  # replica B is blocked on A's rows
            assert b.is_alive(), "replica B finished while A's batch was uncommitted"
            assert time.monotonic() < deadline, "replica B never waited for A's locks"
            time.sleep(0.02)
    b.join(30)
    assert not b.is_alive()

    with ctx.db.session_scope() as s:
        phase = s.scalar(sa.select(Deployment.phase).where(Deployment.device_id == device))
        dev = s.get(Device, device)
        assert dev is not None
        assert (phase, dev.last_report_seq, dev.serving) == ("succeeded", 5, {"det": "2.0.0"})
    # B's reports arrived after A had applied later ones: counted as duplicates, not applied
    assert ctx.metrics.get("fleet_mqtt_duplicates_total", kind="report") >= 2
