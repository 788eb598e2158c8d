"""A compromised device lying about CPU time: one device among ten claiming, with plausible
windows of the most requests a window may hold, that a version costing five times the CPU costs
nothing (or that a cheap one costs a thousand times more) changes no ``max_cpu_ratio`` outcome.
CPU times and resident memory that cannot be true are refused at ingest and counted. Simulated
devices (tests/helpers/fleet_sim.py) through the real ingest, judged by the real engine."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from device_client.protocol import HealthWindow
from device_client.protocol.messages import utcnow
from server.health.tables import HealthSample
from server.mqtt.handlers import REJECTED
from server.rollouts.engine import RolloutEngine
from tests.helpers.fleet_sim import WINDOW_S, Behaviour
from tests.helpers.rollout_lab import drive, make_lab, rollout_body

#: the most a lying device's window can claim and still be stored: every request, in its period
MOST = round(100_000 * WINDOW_S)
BASELINE = Behaviour(cpu_ms=1.0)


@pytest.mark.parametrize(
    ("cpu_ms", "lie", "status"),
    [(5.0, None, "paused"), (5.0, 0.0, "paused"), (1.1, None, "completed"), (1.1, 1000.0, "completed")],
    ids=["costly", "costly-liar", "cheap", "cheap-liar"],
)
def test_one_lying_device_among_ten_changes_no_cpu_outcome(
    app_client, admin_headers, ctx, onnx_model, cpu_ms, lie, status
):
    behaviours = {"1.0.0": BASELINE, "2.0.0": Behaviour(cpu_ms=cpu_ms)}
    lab = make_lab(app_client, admin_headers, ctx, onnx_model, behaviours=behaviours)
    if lie is not None:
        lab.lies[sorted(lab.devices)[0]] = {"requests": MOST, "cpu_ms_per_request": lie}
    body = rollout_body(
        "2.0.0", stages=[{"percent": 100, "soak_s": 0}], on_failure="pause",
        gates={"max_error_rate": None, "max_p95_ratio": None, "min_agreement": None, "max_cpu_ratio": 2.0},
    )  # fmt: skip
    r = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    final = drive(RolloutEngine(ctx), lab, app_client, admin_headers, r.json()["id"])
    assert final["status"] == status, final["reason"]
    numbers = final["verdict"]["numbers"]
    assert numbers["cpu_ms_per_request"] == pytest.approx(cpu_ms)
    assert numbers["baseline_cpu_ms_per_request"] == pytest.approx(1.0)
    if status == "paused":
        ratio = cpu_ms / 1.0
        assert final["reason"] == (
            f"stage 1 gates failed: CPU per request {ratio:.2f}x the same devices' baseline > 2.0x"
        )


def test_implausible_cpu_and_memory_are_refused_and_counted(app_client, admin_headers, ctx, onnx_model):
    lab = make_lab(app_client, admin_headers, ctx, onnx_model, baseline=False)
    device = sorted(lab.devices)[0]
    now = utcnow()

    def send(seq: int, **claims) -> None:
        lab.window(device, seq, now + timedelta(seconds=seq), **claims)

    lies = [
        {"requests": 0, "cpu_ms_per_request": 1.0},  # CPU time without a request
        {"cpu_ms_per_request": 1e9},  # more CPU than 1024 threads have in the window
        {"rss_bytes": 1 << 60},
    ]
    before = ctx.metrics.get(REJECTED, kind="health", reason="implausible_resources")
    for seq, claims in enumerate(lies, start=1):
        send(seq, **claims)
    assert ctx.metrics.get(REJECTED, kind="health", reason="implausible_resources") - before == len(lies)
    # a negative value does not even parse: refused as an invalid payload, never stored
    valid = HealthWindow.build(device_id=device, seq=5, at=now, window_s=1.0, model="det", version="1.0.0",
                               requests=10, errors=0).to_dict()  # fmt: skip
    lab._send([(device, "health", json.dumps(valid | {"cpu_ms_per_request": -1.0}).encode())])
    send(10, cpu_ms_per_request=2.5, rss_bytes=300 << 20, variant="int8")  # true: stored
    with ctx.db.session_scope() as s:
        stored = s.execute(
            sa.select(
                HealthSample.seq,
                HealthSample.cpu_ms_per_request,
                HealthSample.rss_bytes,
                HealthSample.variant,
            ).where(HealthSample.device_id == device)
        ).all()
    assert [tuple(r) for r in stored] == [(10, 2.5, 300 << 20, "int8")]


def test_a_device_naming_a_variant_of_its_own_is_judged_with_its_signed_variant(
    app_client, admin_headers, ctx, onnx_model
):
    """Grouped by the variant its windows claim, a liar would be a variant of one, judged alone
    past the trimmed mean: every error it claims would fail the stage."""
    behaviours = {"1.0.0": Behaviour(), "2.0.0": Behaviour()}
    lab = make_lab(app_client, admin_headers, ctx, onnx_model, behaviours=behaviours)
    lab.lies[sorted(lab.devices)[0]] = {"requests": MOST, "errors": MOST, "variant": "mine"}
    body = rollout_body("2.0.0", stages=[{"percent": 100, "soak_s": 0}], on_failure="pause")
    r = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    final = drive(RolloutEngine(ctx), lab, app_client, admin_headers, r.json()["id"])
    assert final["status"] == "completed", final["reason"]
    assert "variants" not in final["verdict"]  # one variant signed: judged as a whole
    # and shown as a whole: the claimed variant makes no row of its own in the stage views
    [view] = final["stage_views"]
    assert set(view["health"]["variants"]) == {"default"}
