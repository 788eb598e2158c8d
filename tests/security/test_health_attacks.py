"""A compromised device lying to the rollout gates: impossible health windows are refused at
ingest (counted per reason). The devices are simulated (tests/helpers/fleet_sim.py) through the
server's real ingest path."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from device_client.protocol import HealthWindow
from device_client.protocol.messages import utcnow
from server.health.tables import HealthSample
from server.mqtt.handlers import REJECTED
from tests.server.test_rollouts import make_lab


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
