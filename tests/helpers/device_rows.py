"""A device row as enrollment would store it, for tests that seed the devices table directly, and
:func:`notified_devices`: devices seeded with a notified deployment and a signed DesiredState."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from device_client.protocol import DesiredState
from server.devices.tables import Device
from server.rollouts.tables import Deployment, DesiredRecord


def device_row(device_id: str, now: datetime, **over: Any) -> dict[str, Any]:
    """Columns of ``devices`` for ``device_id`` (enrolled, x86_64, nothing served); ``over``
    replaces any of them."""
    row: dict[str, Any] = {
        "id": device_id, "status": "enrolled", "hardware": {}, "arch": "x86_64", "cert_serial": device_id,
        "cert_not_after": now + timedelta(days=1),
        "token_hash": hashlib.sha256(device_id.encode()).hexdigest(), "created_at": now, "serving": {},
        "last_report_seq": 0, "desired_seq": 0,
    }  # fmt: skip
    row.update(over)
    return row


def notified_devices(ctx, prefix: str, n: int) -> list[str]:
    """``n`` enrolled devices, each with a notified deployment (desired seq 1) and a signed
    DesiredState; every other device's state expires within the re-sign window, so coming online
    re-signs it (the presence path)."""
    now = datetime.now(UTC)
    ids = [f"{prefix}-{i:04d}" for i in range(n)]
    states = []
    for i, d in enumerate(ids):
        expires = now + (timedelta(hours=1) if i % 2 == 0 else timedelta(days=6))
        desired = DesiredState.build(
            device_id=d, seq=1, issued_at=now - timedelta(days=1), expires_at=expires, model="det",
            version="2.0.0", release=1, target="det/2.0.0/default/bundle.tar", length=100,
            hashes={"sha256": "ab" * 32},
        )  # fmt: skip
        states.append({
            "device_id": d, "seq": 1, "rollout_id": None, "model": "det", "version": "2.0.0", "release": 1,
            "variant": "default", "mode": "serve", "probation": {}, "issued_at": desired.issued_at,
            "expires_at": expires, "envelope": ctx.director.sign(desired),
        })  # fmt: skip
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(Device.__table__), [device_row(d, now, desired_seq=1) for d in ids])
        s.execute(sa.insert(Deployment.__table__), [
            {"rollout_id": None, "device_id": d, "stage": 0, "model": "det", "version": "2.0.0",
             "phase": "notified", "desired_seq": 1, "details": {}, "created_at": now, "updated_at": now}
            for d in ids
        ])  # fmt: skip
        s.execute(sa.insert(DesiredRecord.__table__), states)
    return ids
