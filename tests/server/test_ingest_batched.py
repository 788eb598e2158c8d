"""MQTT ingest writes a batch with a fixed number of statements, however many devices it holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import event

from device_client.protocol import HealthWindow, Presence, Report
from server.devices.tables import Device
from server.health.tables import HealthSample
from server.mqtt.handlers import IngestWorker
from server.rollouts.tables import Deployment


def _devices(ctx, prefix: str, n: int) -> list[str]:
    now = datetime.now(UTC)
    ids = [f"{prefix}-{i:04d}" for i in range(n)]
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(Device.__table__), [
            {"id": d, "status": "enrolled", "hardware": {}, "arch": "x86_64", "cert_serial": d,
             "cert_not_after": now + timedelta(days=1), "token_hash": f"{prefix[0]}{i:063d}",
             "created_at": now, "serving": {}, "last_report_seq": 0, "desired_seq": 1}
            for i, d in enumerate(ids)
        ])  # fmt: skip
        s.execute(sa.insert(Deployment.__table__), [
            {"rollout_id": None, "device_id": d, "stage": 0, "model": "det", "version": "2.0.0",
             "phase": "notified", "desired_seq": 1, "details": {}, "created_at": now, "updated_at": now}
            for d in ids
        ])  # fmt: skip
    return ids


def _messages(ids: list[str]) -> list[tuple[str, bytes, datetime]]:
    now = datetime.now(UTC)
    out = []
    for d in ids:
        out.append((f"fleet/v1/d/{d}/presence", Presence.build(device_id=d, status="online").to_json(), now))
        for seq, phase in ((1, "downloading"), (2, "installing"), (2, "installing")):
            report = Report.build(
                device_id=d, seq=seq, at=now, phase=phase, desired_seq=1, model="det", version="2.0.0",
                serving={"det": "1.0.0"},
            )  # fmt: skip
            out.append((f"fleet/v1/d/{d}/report", report.to_json(), now))
        health = HealthWindow.build(
            device_id=d, seq=1, at=now, window_s=10, model="det", version="1.0.0", requests=10, errors=0,
            p50_ms=1.0, p95_ms=2.0, p99_ms=3.0,
        )  # fmt: skip
        out.append((f"fleet/v1/d/{d}/health", health.to_json(), now))
    return out


def _statements(ctx, ids: list[str]) -> int:
    worker = IngestWorker(ctx, ctx.metrics)
    count = 0

    def on_execute(*_args) -> None:
        nonlocal count
        count += 1

    event.listen(ctx.db.engine, "before_cursor_execute", on_execute)
    try:
        worker.process(_messages(ids))
    finally:
        event.remove(ctx.db.engine, "before_cursor_execute", on_execute)
    return count


def test_batch_statement_count_does_not_grow_with_devices(ctx):
    small = _statements(ctx, _devices(ctx, "small", 3))
    large_ids = _devices(ctx, "large", 150)
    large = _statements(ctx, large_ids)
    assert large == small, f"{small} statements for 3 devices, {large} for 150"

    with ctx.db.session_scope() as s:
        phases = set(s.scalars(sa.select(Deployment.phase).where(Deployment.device_id.in_(large_ids))))
        devices = s.execute(
            sa.select(Device.status, Device.last_report_seq, Device.serving).where(Device.id.in_(large_ids))
        ).all()
        windows = s.scalar(
            sa.select(sa.func.count()).select_from(HealthSample).where(HealthSample.device_id.in_(large_ids))
        )
    assert phases == {"installing"}
    assert all(tuple(d) == ("online", 2, {"det": "1.0.0"}) for d in devices)
    assert len(devices) == 150
    assert windows == 150
    assert ctx.metrics.get("fleet_mqtt_duplicates_total", kind="report") == 153
