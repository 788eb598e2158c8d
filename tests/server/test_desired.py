"""Signed desired states: direct assignment, variants by hardware, and re-signing for returning devices."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from device_client.protocol import DesiredState, validate_payload
from device_client.protocol.signing import verify_envelope
from server.db import utcnow
from server.rollouts.tables import DesiredRecord, OutboxMessage
from tests.helpers.fleet_sim import SimFleet
from tests.helpers.pki import HARDWARE, make_csr


@pytest.fixture
def device(app_client, admin_headers, onnx_model):
    token = app_client.post("/api/v1/enroll-tokens", json={}, headers=admin_headers).json()["token"]
    csr, _ = make_csr("cam-1")
    assert (
        app_client.post(
            "/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": HARDWARE}
        ).status_code
        == 201
    )
    for version, variant, meta in (
        ("1.0.0", "default", None),
        ("1.0.0", "arm", '{"constraints": {"arch": ["aarch64"]}}'),
    ):
        with open(onnx_model(f"m-{variant}.onnx"), "rb") as fh:
            data = {"version": version, "variant": variant, **({"metadata": meta} if meta else {})}
            r = app_client.post(
                "/api/v1/models/det/versions",
                data=data,
                files={"file": ("m.onnx", fh, "application/octet-stream")},
                headers=admin_headers,
            )
            assert r.status_code == 201, r.text
    return "cam-1"


def test_assign_signs_picks_the_fitting_variant_and_queues(app_client, admin_headers, ctx, device):
    r = app_client.put(
        f"/api/v1/devices/{device}/desired", json={"model": "det", "version": "1.0.0"}, headers=admin_headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["variant"] == "default"  # the aarch64 variant does not fit an x86_64 device
    r = app_client.put(
        f"/api/v1/devices/{device}/desired",
        json={"model": "det", "version": "1.0.0", "variant": "arm"},
        headers=admin_headers,
    )
    assert r.status_code == 422
    assert "does not fit" in r.json()["detail"]
    r = app_client.put(
        f"/api/v1/devices/{device}/desired", json={"model": "det", "version": "2.0.0"}, headers=admin_headers
    )
    assert r.status_code == 404
    r = app_client.put(
        f"/api/v1/devices/{device}/desired",
        json={"model": "det", "version": "1.0.0", "probation": {"max_error_rate": 7}},
        headers=admin_headers,
    )
    assert r.status_code == 422
    with ctx.db.session_scope() as s:
        rows = s.scalars(sa.select(OutboxMessage)).all()
        assert [(m.topic, m.qos, m.retain) for m in rows] == [("fleet/v1/d/cam-1/desired", 1, True)]
        record = s.get(DesiredRecord, device)
        desired = validate_payload(
            verify_envelope(record.envelope, [ctx.director.key.public_key()]), DesiredState
        )
    assert desired.seq == 1
    assert desired.target.endswith("/default/bundle.tar")


def test_returning_device_gets_its_expiring_state_resigned(app_client, admin_headers, ctx, device):
    app_client.put(
        f"/api/v1/devices/{device}/desired", json={"model": "det", "version": "1.0.0"}, headers=admin_headers
    )
    fleet = SimFleet(ctx, [device])
    fleet.presence(device, online=False)
    with ctx.db.session_scope() as s:  # a week offline: the retained state has expired
        record = s.get(DesiredRecord, device)
        record.expires_at = utcnow() - timedelta(days=1)
    fleet.presence(device, online=True)
    with ctx.db.session_scope() as s:
        record = s.get(DesiredRecord, device)
        desired = validate_payload(
            verify_envelope(record.envelope, [ctx.director.key.public_key()]), DesiredState
        )
        outbox = s.scalar(sa.select(sa.func.count()).select_from(OutboxMessage))
    assert desired.seq == 2
    assert desired.expires_at > utcnow() + timedelta(days=6)
    assert (desired.model, desired.version) == ("det", "1.0.0")
    assert outbox == 2
    # a device that is merely seen again with a fresh state is not re-signed
    fleet.presence(device, online=False)
    fleet.presence(device, online=True)
    with ctx.db.session_scope() as s:
        assert s.get(DesiredRecord, device).seq == 2
