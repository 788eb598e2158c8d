"""The server's MQTT bridge end to end: signed desired states out through the outbox, reports,
health and presence in through shared subscriptions, malformed messages counted."""

from __future__ import annotations

import json
import threading
import time

import pytest
import sqlalchemy as sa

from device_client.protocol import DesiredState, HealthWindow, Presence, Report, validate_payload
from device_client.protocol.messages import utcnow
from device_client.protocol.signing import public_key_from_pem, verify_envelope
from server.devices.tables import Device, DeviceEvent
from server.health.tables import HealthSample
from server.rollouts.tables import Deployment, DesiredRecord
from server.trust.keys import atomic_write
from tests.helpers.mosquitto import Broker, mqtt_connect, subscribe_sync
from tests.helpers.pki import HARDWARE, key_pem, make_csr

pytestmark = pytest.mark.mqtt


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def enroll_device(client, headers, device_id, tmp_path):
    token = client.post("/api/v1/enroll-tokens", json={}, headers=headers).json()["token"]
    csr, key = make_csr(device_id)
    body = client.post("/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": HARDWARE}).json()
    cert, keyf = tmp_path / f"{device_id}.crt", tmp_path / f"{device_id}.key"
    atomic_write(cert, body["certificate_pem"].encode())
    atomic_write(keyf, key_pem(key), mode=0o600)
    return body, cert, keyf


def push(client, headers, onnx_model, version, **kw):
    path = onnx_model(f"m-{version}.onnx", **kw)
    with open(path, "rb") as fh:
        r = client.post(
            "/api/v1/models/det/versions",
            data={"version": version},
            files={"file": ("m.onnx", fh, "application/octet-stream")},
            headers=headers,
        )
    assert r.status_code == 201, r.text
    return r.json()


def device_broker(ctx, settings) -> Broker:
    from server.mqtt.broker import BrokerFiles

    return Broker(
        ca=ctx.ca,
        files=BrokerFiles(settings.broker_dir, settings.mqtt_port),
        process=None,
        workdir=settings.broker_dir,
    )


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_desired_state_report_health_presence_round_trip(mqtt_app, mqtt_token, onnx_model, tmp_path):
    client, ctx, _runtime = mqtt_app
    headers = {"Authorization": f"Bearer {mqtt_token('operator')}"}
    enrolled, cert, key = enroll_device(client, headers, "cam-7", tmp_path)
    push(client, headers, onnx_model, "1.0.0")

    device = mqtt_connect(device_broker(ctx, ctx.settings), cert, key)
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(c, u, msg):
        got.append(msg.payload)
        arrived.set()

    device.on_message = on_message
    subscribe_sync(device, "fleet/v1/d/cam-7/desired")

    r = client.put(
        "/api/v1/devices/cam-7/desired", json={"model": "det", "version": "1.0.0"}, headers=headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["seq"] == 1
    assert arrived.wait(10), "desired state not delivered"
    envelope = json.loads(got[-1])
    director = public_key_from_pem(enrolled["director_public_key_pem"])
    desired = validate_payload(verify_envelope(envelope, [director]), DesiredState)
    assert (desired.device_id, desired.seq, desired.model, desired.version) == ("cam-7", 1, "det", "1.0.0")
    assert desired.target.startswith("det/1.0.0/")

    def outbox_drained():
        with ctx.db.session_scope() as s:
            return s.scalar(sa.text("select count(*) from mqtt_outbox where published_at is null")) == 0

    wait_for(outbox_drained)
    with ctx.db.session_scope() as s:  # each row published once, on its first attempt
        assert s.execute(sa.text("select distinct attempts from mqtt_outbox")).scalars().all() == [1]

    # the device reports progress (one duplicate), health and presence
    def report(seq, phase, **kw):
        return Report.build(
            device_id="cam-7",
            seq=seq,
            at=utcnow(),
            phase=phase,
            desired_seq=1,
            model="det",
            version="1.0.0",
            **kw,
        ).to_json()

    device.publish(
        "fleet/v1/d/cam-7/presence", Presence.build(device_id="cam-7", status="online").to_json(), qos=1
    )
    for seq, phase in (
        (1, "downloading"),
        (2, "verifying"),
        (2, "verifying"),
        (3, "installing"),
        (4, "probation"),
        (5, "succeeded"),
    ):
        device.publish("fleet/v1/d/cam-7/report", report(seq, phase, serving={"det": "1.0.0"}), qos=1)
    health = HealthWindow.build(
        device_id="cam-7",
        seq=1,
        at=utcnow(),
        window_s=10,
        model="det",
        version="1.0.0",
        requests=100,
        errors=1,
        p50_ms=1.0,
        p95_ms=2.0,
        p99_ms=3.0,
    )
    device.publish("fleet/v1/d/cam-7/health", health.to_json(), qos=1)
    device.publish("fleet/v1/d/cam-7/health", health.to_json(), qos=1)  # duplicate window

    def settled():
        with ctx.db.session_scope() as s:
            dep = s.scalars(sa.select(Deployment).where(Deployment.device_id == "cam-7")).one()
            n_health = s.scalar(sa.select(sa.func.count()).select_from(HealthSample))
            return dep.phase == "succeeded" and n_health == 1

    wait_for(settled)
    with ctx.db.session_scope() as s:
        events = s.scalars(sa.select(DeviceEvent.seq).order_by(DeviceEvent.seq)).all()
        dev = s.get(Device, "cam-7")
        assert events == [1, 2, 3, 4, 5]
        assert dev.status == "online"
        assert dev.serving == {"det": "1.0.0"}
        assert dev.last_report_seq == 5
    assert ctx.metrics.get("fleet_mqtt_duplicates_total", kind="report") == 1
    events_api = client.get("/api/v1/devices/cam-7/events", headers=headers).json()
    assert [e["phase"] for e in events_api][:2] == ["succeeded", "probation"]

    device.disconnect()
    device.loop_stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_malformed_messages_are_counted_and_do_not_stop_ingest(mqtt_app, mqtt_token, tmp_path):
    client, ctx, _runtime = mqtt_app
    headers = {"Authorization": f"Bearer {mqtt_token('operator')}"}
    _, cert, key = enroll_device(client, headers, "fuzz-1", tmp_path)
    device = mqtt_connect(device_broker(ctx, ctx.settings), cert, key)
    bad = [
        ("report", b"not json"),
        ("report", b"[]"),
        ("report", json.dumps({"schema": "fleet.report/9"}).encode()),
        ("health", json.dumps({"schema": "fleet.health/1", "device_id": "fuzz-1"}).encode()),
        ("presence", Presence.build(device_id="other-1", status="online").to_json()),
        ("report", b"\x00" * 70000),
    ]
    for kind, payload in bad:
        device.publish(f"fleet/v1/d/fuzz-1/{kind}", payload, qos=1).wait_for_publish(20)
    device.publish(
        "fleet/v1/d/fuzz-1/presence", Presence.build(device_id="fuzz-1", status="online").to_json(), qos=1
    ).wait_for_publish(20)

    def online():
        with ctx.db.session_scope() as s:
            return s.get(Device, "fuzz-1").status == "online"

    wait_for(online)
    wait_for(lambda: ctx.metrics.total("fleet_mqtt_rejected_total") >= len(bad))
    assert ctx.metrics.get("fleet_mqtt_rejected_total", kind="report", reason="invalid_payload") == 4
    assert ctx.metrics.get("fleet_mqtt_rejected_total", kind="presence", reason="device_mismatch") == 1
    text = client.get("/metrics").text
    assert 'fleet_mqtt_rejected_total{kind="report",reason="invalid_payload"} 4' in text
    device.disconnect()
    device.loop_stop()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_an_older_desired_state_published_last_is_followed_by_the_current(
    mqtt_app, mqtt_token, onnx_model, tmp_path
):
    """Replicas' publishers run side by side (SKIP LOCKED): one may publish seq 1 after another
    published seq 2, leaving the broker retaining the outdated state. The late publisher finds
    the newer state in the database and publishes it again, so the broker ends up retaining it."""
    from server.rollouts.outbox import enqueue

    client, ctx, _runtime = mqtt_app
    headers = {"Authorization": f"Bearer {mqtt_token('operator')}"}
    _, cert, key = enroll_device(client, headers, "cam-8", tmp_path)
    push(client, headers, onnx_model, "1.0.0")
    push(client, headers, onnx_model, "1.1.0", seed=2)
    envelopes = []
    for version in ("1.0.0", "1.1.0"):
        want = {"model": "det", "version": version}
        r = client.put("/api/v1/devices/cam-8/desired", json=want, headers=headers)
        assert r.status_code == 200, r.text
        with ctx.db.session_scope() as s:
            envelopes.append(s.get(DesiredRecord, "cam-8").envelope)
    assert [e["signed"]["seq"] for e in envelopes] == [1, 2]

    def outbox_drained():
        with ctx.db.session_scope() as s:
            return s.scalar(sa.text("select count(*) from mqtt_outbox where published_at is null")) == 0

    wait_for(outbox_drained)
    with ctx.db.session_scope() as s:  # the slow replica's publish of seq 1 comes in last
        enqueue(s, "fleet/v1/d/cam-8/desired", json.dumps(envelopes[0]).encode(), retain=True)
    wait_for(outbox_drained)

    def retained_seq() -> int:
        device = mqtt_connect(device_broker(ctx, ctx.settings), cert, key)
        got: list[bytes] = []
        arrived = threading.Event()
        device.on_message = lambda c, u, msg: (got.append(msg.payload), arrived.set())
        subscribe_sync(device, "fleet/v1/d/cam-8/desired")
        assert arrived.wait(10), "no retained desired state"
        device.disconnect()
        return json.loads(got[-1])["signed"]["seq"]

    assert retained_seq() == 2
    assert "fleet_mqtt_desired_superseded_total 1" in ctx.metrics.render()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_server_the_broker_acl_does_not_list_refuses_to_start(mqtt_settings, broker_process):
    """Mosquitto lets in a client its ACL does not list and grants its subscriptions, but
    delivers it nothing and refuses its publishes: in a shared subscription group, the share of
    the fleet's messages handed to it would be lost. A server whose identities the ACL in
    broker_dir lacks (a replica left out of `fleet broker config --server-name`) does not start."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.mqtt.broker import UnlistedServerIdentity

    s = mqtt_settings.model_copy(update={"mqtt_server_name": "unlisted"})
    unlisted = r"identities fleet_server\.unlisted, fleet_server\.unlisted\.pub:"
    with pytest.raises(UnlistedServerIdentity, match=unlisted), TestClient(create_app(s)):
        pass
