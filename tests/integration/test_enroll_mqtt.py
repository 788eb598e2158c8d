"""An enrolled device's certificate opens an mTLS session to Mosquitto; foreign CAs are refused,
and the ACL confines a device to its own topics."""

from __future__ import annotations

import threading

import pytest

from server.trust.keys import atomic_write
from server.trust.pki import FleetCA
from tests.helpers.mosquitto import ConnectFailed, mqtt_connect, subscribe_sync, tls_refusal
from tests.helpers.pki import HARDWARE, key_pem, make_csr

pytestmark = pytest.mark.mqtt


def _enroll(app_client, admin_headers, device_id: str, tmp_path):
    token = app_client.post("/api/v1/enroll-tokens", json={}, headers=admin_headers).json()["token"]
    csr, key = make_csr(device_id)
    r = app_client.post("/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": HARDWARE})
    assert r.status_code == 201, r.text
    cert_path, key_path = tmp_path / f"{device_id}.crt", tmp_path / f"{device_id}.key"
    atomic_write(cert_path, r.json()["certificate_pem"].encode())
    atomic_write(key_path, key_pem(key), mode=0o600)
    return cert_path, key_path


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_enrolled_certificate_connects_and_foreign_ca_is_refused(
    app_client, admin_headers, ctx, broker_factory, tmp_path
):
    broker = broker_factory(ctx.ca)
    cert, key = _enroll(app_client, admin_headers, "edge-1", tmp_path)
    client = mqtt_connect(broker, cert, key)
    assert client.is_connected()
    client.disconnect()
    client.loop_stop()

    # a certificate for the same CN from another CA is refused at the TLS handshake
    rogue = FleetCA(tmp_path / "rogue")
    rogue_cert, rogue_key = tmp_path / "rogue.crt", tmp_path / "rogue.key"
    from server.mqtt.broker import issue_client_files

    issue_client_files(rogue, "edge-1", rogue_cert, rogue_key)
    assert tls_refusal(broker, rogue_cert, rogue_key) == "TLSV1_ALERT_UNKNOWN_CA"
    with pytest.raises(ConnectFailed) as failed:
        mqtt_connect(broker, rogue_cert, rogue_key, ca_file=broker.files.ca)
    assert failed.value.kind == "tls", failed.value


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_acl_confines_device_to_its_own_topics(app_client, admin_headers, ctx, broker_factory, tmp_path):
    broker = broker_factory(ctx.ca)
    cert_a, key_a = _enroll(app_client, admin_headers, "dev-a", tmp_path)
    cert_b, key_b = _enroll(app_client, admin_headers, "dev-b", tmp_path)
    a = mqtt_connect(broker, cert_a, key_a)
    b = mqtt_connect(broker, cert_b, key_b)
    server = mqtt_connect(broker, broker.files.server_cert, broker.files.server_key)
    inbox: dict[str, list[tuple[str, bytes]]] = {"a": [], "b": [], "server": []}
    events = {name: threading.Event() for name in inbox}

    def collector(name):
        def on_message(client, userdata, msg):
            inbox[name].append((msg.topic, msg.payload))
            events[name].set()

        return on_message

    for name, client in (("a", a), ("b", b), ("server", server)):
        client.on_message = collector(name)
    # dev-b tries to eavesdrop on dev-a's reports; the server listens to all reports
    subscribe_sync(b, "fleet/v1/d/dev-a/report")
    subscribe_sync(b, "fleet/v1/d/dev-b/desired")
    subscribe_sync(a, "fleet/v1/d/dev-a/desired")
    subscribe_sync(server, "fleet/v1/d/+/report")
    subscribe_sync(server, "fleet/v1/d/+/desired")

    # dev-a forges a desired state for dev-b: the broker drops it
    a.publish("fleet/v1/d/dev-b/desired", b'{"forged": true}', qos=1).wait_for_publish(20)
    # dev-a publishes its own report: only the server gets it, not dev-b
    a.publish("fleet/v1/d/dev-a/report", b'{"own": true}', qos=1).wait_for_publish(20)
    assert events["server"].wait(20)
    # the server may publish a desired state to dev-b, which receives it
    server.publish("fleet/v1/d/dev-b/desired", b'{"from": "server"}', qos=1).wait_for_publish(20)
    assert events["b"].wait(20)
    # a publish arriving after both proves earlier ones were not merely slow
    server.publish("fleet/v1/d/dev-a/desired", b'{"fence": 1}', qos=1).wait_for_publish(20)
    assert events["a"].wait(20)

    assert inbox["b"] == [("fleet/v1/d/dev-b/desired", b'{"from": "server"}')]
    assert ("fleet/v1/d/dev-a/report", b'{"own": true}') in inbox["server"]
    assert all(payload != b'{"forged": true}' for _, payload in inbox["server"])
    for c in (a, b, server):
        c.disconnect()
        c.loop_stop()
