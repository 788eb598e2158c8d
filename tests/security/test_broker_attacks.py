"""Attacks on the MQTT broker: a device is confined to its own topics (ACL ``pattern`` on ``%u``)
and to its own client id (``use_username_as_clientid``), and only current certificates of the
fleet CA get in (mTLS, CRL).

Devices are enrolled through the real enrollment endpoint; the broker is the embedded one
(``start_embedded_broker``: the config, CA and CRL of the server's ``broker_dir``), so a
decommission through the admin API writes the very CRL this broker loads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_client.protocol.topics import PREFIX
from server.mqtt.broker import BrokerFiles, free_port, issue_client_files
from server.mqtt.handlers import RECEIVED
from server.trust.keys import atomic_write, private_key_pem
from server.trust.pki import FleetCA, cert_pem
from tests.helpers.device_fleet import enroll_device, wait_for
from tests.helpers.mosquitto import Broker, ConnectFailed, mqtt_connect, tls_refusal
from tests.helpers.pki import HARDWARE, key_pem, make_csr

pytestmark = pytest.mark.mqtt

NOT_AUTHORIZED = 135  # MQTT 5 reason code of a PUBACK the ACL refused
#: OpenSSL's reasons for the broker's TLS alerts: a certificate of a CA it does not trust, one the
#: CRL revokes, and every certificate while its CRL is past nextUpdate. A timeout, a refused TCP
#: connection, a close without an alert or a CONNACK failure is none of these, so a broker that is
#: down or misconfigured fails these tests.
UNKNOWN_CA = "TLSV1_ALERT_UNKNOWN_CA"
REVOKED = "SSLV3_ALERT_CERTIFICATE_REVOKED"
CRL_EXPIRED = "SSLV3_ALERT_CERTIFICATE_EXPIRED"


def refused(broker: Broker, cert: Path, key: Path) -> str:
    """The broker's alert refusing ``cert`` in the TLS handshake (tls_refusal: it fails the test on
    anything else); and a real MQTT client with that certificate fails its TLS handshake too."""
    reason = tls_refusal(broker, cert, key)
    assert reason is not None, "the broker accepted the certificate"
    with pytest.raises(ConnectFailed) as failed:
        mqtt_connect(broker, cert, key, client_id=f"refused-{time.monotonic()}").disconnect()
    assert failed.value.kind == "tls", failed.value
    return reason


@pytest.fixture
def fleet(settings, tmp_path) -> Iterator[tuple]:
    """(TestClient, ServerContext, settings) of a server without the MQTT bridge."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    s = settings.model_copy(update={"mqtt_port": free_port()})
    with TestClient(create_app(s)) as client:
        yield client, client.app.state.ctx, s


@pytest.fixture
def embedded(fleet) -> Iterator[Broker]:
    """The embedded broker of ``fleet``; ``restart()`` starts it again (re-reading the CRL)."""
    from server.runner import start_embedded_broker

    _, ctx, s = fleet
    proc = start_embedded_broker(s)
    broker = Broker(
        ca=ctx.ca, files=BrokerFiles(s.broker_dir, s.mqtt_port), process=proc, workdir=s.broker_dir
    )
    yield broker
    broker.process.stop()


def _admin(fleet) -> dict[str, str]:
    from tests.helpers.tokens import create_admin_token

    return {"Authorization": f"Bearer {create_admin_token(fleet[1], 'admin')}"}


def _enroll(fleet, device_id: str, tmp_path: Path) -> tuple[Path, Path]:
    client = fleet[0]
    token = client.post("/api/v1/enroll-tokens", json={}, headers=_admin(fleet)).json()["token"]
    csr, key = make_csr(device_id)
    r = client.post("/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": HARDWARE})
    assert r.status_code == 201, r.text
    cert, keyfile = tmp_path / f"{device_id}.crt", tmp_path / f"{device_id}.key"
    atomic_write(cert, r.json()["certificate_pem"].encode())
    atomic_write(keyfile, key_pem(key), mode=0o600)
    return cert, keyfile


class Listener:
    """A connected client that records what it receives and the reason code of its publishes."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.got: list[tuple[str, bytes]] = []
        self.acks: dict[int, int] = {}
        self.cond = threading.Condition()
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe

    def _on_message(self, c, u, msg) -> None:
        with self.cond:
            self.got.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def _on_publish(self, c, u, mid, reason_code, props) -> None:
        with self.cond:
            self.acks[mid] = reason_code.value
            self.cond.notify_all()

    def _on_subscribe(self, c, u, mid, codes, props) -> None:
        with self.cond:
            self.acks[-mid] = max(rc.value for rc in codes)
            self.cond.notify_all()

    def subscribe(self, *filters: str) -> None:
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        with self.cond:
            assert self.cond.wait_for(lambda: -mid in self.acks, 5)

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1; return the broker's PUBACK reason code."""
        mid = self.client.publish(topic, payload, qos=1).mid
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.acks, 5)
            return self.acks[mid]

    def wait_for(self, payload: bytes, timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: any(p == payload for _, p in self.got), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients(fleet, embedded, tmp_path) -> Iterator[dict[str, Listener]]:
    a = Listener(mqtt_connect(embedded, *_enroll(fleet, "dev-a", tmp_path)))
    b = Listener(mqtt_connect(embedded, *_enroll(fleet, "dev-b", tmp_path)))
    server = Listener(mqtt_connect(embedded, embedded.files.server_cert, embedded.files.server_key))
    server.subscribe("fleet/v1/d/#")
    yield {"a": a, "b": b, "server": server}
    for c in (a, b, server):
        c.close()


def test_device_cannot_publish_on_another_devices_topics(clients):
    # protection: ACL `pattern write fleet/v1/d/%u/{report,health,presence}`; `desired` is the
    # server's alone. Every forged publish gets a "not authorized" PUBACK and reaches nobody.
    a, server = clients["a"], clients["server"]
    for kind in ("report", "health", "presence", "desired"):
        assert a.publish(f"fleet/v1/d/dev-b/{kind}", b"forged") == NOT_AUTHORIZED, kind
    assert a.publish("fleet/v1/d/dev-a/desired", b"self-desired") == NOT_AUTHORIZED
    assert a.publish("fleet/v1/d/dev-a/report", b"fence") == 0
    server.wait_for(b"fence")  # a later publish arrived, so the forged ones were not merely slow
    assert [t for t, p in server.got if p in (b"forged", b"self-desired")] == []


def test_device_cannot_subscribe_to_another_devices_topics(clients):
    # protection: ACL `pattern read fleet/v1/d/%u/desired`: mosquitto grants wildcard filters but
    # delivers only what the ACL lets this client read
    a, b, server = clients["a"], clients["b"], clients["server"]
    b.subscribe("fleet/v1/d/dev-a/desired", "fleet/v1/d/+/desired", "fleet/v1/d/#", "#")
    a.subscribe("fleet/v1/d/dev-a/desired")
    assert server.publish("fleet/v1/d/dev-a/desired", b"for-a") == 0
    assert a.publish("fleet/v1/d/dev-a/report", b"a-report") == 0
    assert server.publish("fleet/v1/d/dev-b/desired", b"for-b") == 0
    a.wait_for(b"for-a")
    b.wait_for(b"for-b")
    time.sleep(0.2)
    assert {p for _, p in b.got} == {b"for-b"}


def test_certificate_from_another_ca_is_refused(fleet, embedded, tmp_path):
    # protection: `require_certificate true` with the fleet CA as the only `cafile`. The genuine
    # certificate of the same device id gets in, before and after, on the same broker: the refusal
    # is the broker's TLS alert about the rogue CA, not a broker that is down.
    genuine = _enroll(fleet, "dev-a", tmp_path)
    mqtt_connect(embedded, *genuine, client_id="genuine-1").disconnect()
    rogue = FleetCA(tmp_path / "rogue-ca")
    cert, key = tmp_path / "rogue.crt", tmp_path / "rogue.key"
    issue_client_files(rogue, "dev-a", cert, key)
    assert refused(embedded, cert, key) == UNKNOWN_CA
    mqtt_connect(embedded, *genuine, client_id="genuine-2").disconnect()


def test_decommissioned_certificate_refused_by_a_broker_started_afterwards(fleet, tmp_path):
    # protection: decommission puts the serial on the CRL that the broker loads (`crlfile`)
    from server.runner import start_embedded_broker

    _, ctx, s = fleet
    cert, key = _enroll(fleet, "dev-gone", tmp_path)
    other = _enroll(fleet, "dev-stays", tmp_path)
    r = fleet[0].post("/api/v1/devices/dev-gone/decommission", headers=_admin(fleet))
    assert r.status_code == 200, r.text
    broker = Broker(
        ca=ctx.ca,
        files=BrokerFiles(s.broker_dir, s.mqtt_port),
        process=start_embedded_broker(s),
        workdir=s.broker_dir,
    )
    try:
        assert refused(broker, cert, key) == REVOKED
        mqtt_connect(broker, *other).disconnect()  # the CRL revokes that one certificate only
    finally:
        broker.process.stop()


def test_decommissioned_certificate_refused_by_the_running_broker(fleet, embedded, tmp_path):
    # protection: after writing the CRL, decommission makes the local broker re-read it (SIGHUP);
    # without that, mosquitto keeps the CRL it read at start and lets the revoked device back in.
    # (A connection open at decommission time: the next test.)
    cert, key = _enroll(fleet, "dev-gone", tmp_path)
    mqtt_connect(embedded, cert, key, client_id="before").disconnect()
    r = fleet[0].post("/api/v1/devices/dev-gone/decommission", headers=_admin(fleet))
    assert r.status_code == 200, r.text
    other = _enroll(fleet, "dev-stays", tmp_path)
    deadline = time.monotonic() + 5
    while tls_refusal(embedded, cert, key) is None:  # the reload is asynchronous in mosquitto
        assert time.monotonic() < deadline, "the running broker still accepts a revoked certificate"
        time.sleep(0.2)
    assert refused(embedded, cert, key) == REVOKED
    mqtt_connect(embedded, *other).disconnect()  # the reloaded broker still serves the rest


def test_a_connection_open_at_decommission_is_cut_and_stays_out(fleet, embedded, tmp_path):
    # protection: TLS checks the CRL at the handshake only, so decommission also takes the
    # device's session over (server/mqtt/kick.py): the broker closes the open connection
    # ("session taken over"), and the device's reconnects meet the reloaded CRL. Without the
    # takeover the connection stays up and the device keeps reading its topics.
    from server.mqtt.kick import SECOND_KICK_S

    cert, key = _enroll(fleet, "dev-open", tmp_path)
    client = mqtt_connect(embedded, cert, key)  # client id = device id, as a real device
    reasons: list[int] = []
    cut = threading.Event()

    def on_disconnect(c, u, flags, reason_code, props) -> None:
        reasons.append(reason_code.value)
        cut.set()

    client.on_disconnect = on_disconnect
    client.reconnect_delay_set(min_delay=1, max_delay=1)  # paho keeps trying to come back
    try:
        assert client.is_connected()
        r = fleet[0].post("/api/v1/devices/dev-open/decommission", headers=_admin(fleet))
        assert r.status_code == 200, r.text
        assert cut.wait(5), "the open connection of a decommissioned device was not cut"
        # MQTT 5 says "session taken over" (142); Mosquitto 2.0 just closes the socket (paho: 128)
        assert reasons[0] in (128, 142)
        time.sleep(SECOND_KICK_S + 1.5)  # past the second takeover and a reconnect attempt
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # and it stays out: every reconnect is refused
            assert not client.is_connected(), "the revoked device got back in"
            time.sleep(0.1)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("cn", ["+", "#", "dev-a/#", "dev+x"])
def test_ca_refuses_a_wildcard_common_name(fleet, cn):
    # protection: parse_csr accepts only CNs matching the device id pattern
    client = fleet[0]
    token = client.post("/api/v1/enroll-tokens", json={}, headers=_admin(fleet)).json()["token"]
    csr, _ = make_csr(cn)
    r = client.post("/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": HARDWARE})
    assert r.status_code == 422
    assert r.json()["detail"] == f"CSR CN {cn!r} is not a valid device id ([a-z0-9][a-z0-9-]{{0,62}})"


@pytest.mark.parametrize("cn", ["+", "#"])
def test_hand_made_wildcard_cn_cannot_exploit_the_pattern_acl(fleet, clients, embedded, tmp_path, cn):
    # Suppose the fleet CA key itself signs a certificate with CN "+" or "#" (the CA refuses, see
    # above; this is a stolen-CA-key or a bug scenario). With `%u` substituted, the pattern ACL
    # would read `fleet/v1/d/+/desired` and allow `fleet/v1/d/+/report`: every device's topics.
    # protection: mosquitto (>= 1.4.12, CVE-2017-7650) denies pattern ACLs to a username holding
    # a wildcard. The client connects but reads and writes nothing.
    ctx = fleet[1]
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "wild.crt", tmp_path / "wild.key"
    atomic_write(cert_path, cert_pem(ctx.ca.issue_client(csr, cn, 1)).encode())
    atomic_write(key_path, private_key_pem(key), mode=0o600)
    wild = Listener(mqtt_connect(embedded, cert_path, key_path, client_id="wild"))
    try:
        wild.subscribe("fleet/v1/d/+/desired", "fleet/v1/d/dev-a/desired")
        assert wild.publish("fleet/v1/d/dev-a/report", b"spoofed") == NOT_AUTHORIZED
        server = clients["server"]
        clients["a"].subscribe("fleet/v1/d/dev-a/desired")
        assert server.publish("fleet/v1/d/dev-a/desired", b"for-a") == 0
        clients["a"].wait_for(b"for-a")  # it was delivered, to dev-a only
        assert clients["a"].publish("fleet/v1/d/dev-a/report", b"fence") == 0
        server.wait_for(b"fence")
        time.sleep(0.2)
        assert wild.got == []
        assert [p for _, p in server.got if p == b"spoofed"] == []
    finally:
        wild.close()


def test_a_recreated_broker_dir_still_refuses_a_decommissioned_device(fleet, tmp_path):
    # protection: the embedded broker's CRL is written from the database's revocations when it
    # starts. Before, a lost broker_dir got an empty CRL, letting every decommissioned device back in.
    import shutil

    from server.runner import start_embedded_broker

    _, ctx, s = fleet
    cert, key = _enroll(fleet, "dev-gone", tmp_path)
    other = _enroll(fleet, "dev-stays", tmp_path)
    assert fleet[0].post("/api/v1/devices/dev-gone/decommission", headers=_admin(fleet)).status_code == 200
    shutil.rmtree(s.broker_dir)
    broker = Broker(
        ca=ctx.ca, files=BrokerFiles(s.broker_dir, s.mqtt_port), process=start_embedded_broker(s),
        workdir=s.broker_dir,
    )  # fmt: skip
    try:
        assert refused(broker, cert, key) == REVOKED
        mqtt_connect(broker, *other).disconnect()
    finally:
        broker.process.stop()


def test_an_expired_crl_is_reissued_and_the_running_broker_reloads_it(fleet, embedded, tmp_path):
    # A CRL past its nextUpdate makes the broker refuse EVERY handshake ("CRL has expired"): the
    # fleet and the server's own link. protection: refresh_broker_crl (start-up and the periodic
    # refresh job) re-issues it from the database before then and SIGHUPs the local broker.
    from datetime import UTC, datetime, timedelta

    from server.devices.crl import refresh_broker_crl
    from server.devices.repository import RevocationRepository

    ctx = fleet[1]
    cert, key = _enroll(fleet, "dev-gone", tmp_path)
    other = _enroll(fleet, "dev-ok", tmp_path)
    assert fleet[0].post("/api/v1/devices/dev-gone/decommission", headers=_admin(fleet)).status_code == 200
    with ctx.db.session_scope() as session:
        revoked = RevocationRepository(session).all()
    ctx.ca.write_crl(embedded.files.crl, revoked, now=datetime.now(UTC) - timedelta(days=31))
    embedded.process.reload()

    def connects(files: tuple[Path, Path]) -> bool:
        """True if the handshake completes, False if the broker's alert says the CRL has expired
        (any other outcome, a broker not listening included, fails the test)."""
        reason = tls_refusal(embedded, *files)
        assert reason in (None, CRL_EXPIRED), reason
        return reason is None

    server_identity = (embedded.files.server_cert, embedded.files.server_key)
    deadline = time.monotonic() + 5
    while connects(server_identity):  # the reload is asynchronous in mosquitto
        assert time.monotonic() < deadline, "the broker kept accepting handshakes under an expired CRL"
        time.sleep(0.2)
    assert refused(embedded, *other) == CRL_EXPIRED

    written = refresh_broker_crl(ctx)
    assert written is not None
    assert written.reloaded >= 1, written
    deadline = time.monotonic() + 5
    while not connects(server_identity):
        assert time.monotonic() < deadline, "the re-issued CRL did not let the server back in"
        time.sleep(0.2)
    assert connects(other)
    assert refused(embedded, cert, key) == REVOKED  # the re-issued CRL still revokes the decommissioned one


# -- client ids: every connection's client id is its certificate's CN ------------------------------
PROTOCOLS = [pytest.param(mqtt.MQTTv5, id="mqtt5"), pytest.param(mqtt.MQTTv311, id="mqtt311")]


def _broker_of(live, process) -> Broker:
    s = live.settings
    return Broker(ca=live.ctx.ca, files=BrokerFiles(s.broker_dir, s.mqtt_port), process=process,
                  workdir=s.broker_dir)  # fmt: skip


def _reports(live) -> float:
    return live.ctx.metrics.get(RECEIVED, kind="report")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("target", ["server-consumer", "server-publisher", "device"])
def test_a_device_cannot_take_over_another_clients_id(
    live_server, broker_process, tmp_path, target, protocol
):
    # The attack: an enrolled device connects with a client id that is not its own, with a clean
    # start: the server's consuming link's (`fleet_server.NAME`), its publisher's (`....pub`), or
    # another device's. With client ids of the client's choosing the broker closes that client's
    # connection and discards its session; repeated, it stops the fleet's ingest and publishing.
    # protection: `use_username_as_clientid`: the broker gives every connection its certificate's
    # CN as client id, so the intruder only ever replaces its own session. While it is connected,
    # a report goes through the server's consuming link and a message through its publisher.
    live = live_server
    runtime = live.mqtt
    broker = _broker_of(live, broker_process)
    victim_id = enroll_device(live, tmp_path / "victim", "dev-victim")
    attacker = enroll_device(live, tmp_path / "attacker", "dev-attacker")
    victim = Listener(mqtt_connect(broker, victim_id.cert_file, victim_id.key_file, client_id="dev-victim"))
    victim_cut = threading.Event()
    victim.client.on_disconnect = lambda *args: victim_cut.set()
    links = (runtime.link, runtime.publisher)
    assert [link.client_id for link in links] == ["fleet_server.test-server", "fleet_server.test-server.pub"]
    connects = [link._session for link in links]  # bumped on every (re)connect
    target_id = {"server-consumer": links[0].client_id, "server-publisher": links[1].client_id}.get(
        target, "dev-victim"
    )
    try:
        victim.subscribe(f"{PREFIX}/dev-victim/desired")
        intruder = mqtt_connect(broker, attacker.cert_file, attacker.key_file, client_id=target_id,
                                protocol=protocol)  # fmt: skip
        try:
            reports = _reports(live) + 1
            assert victim.publish(f"{PREFIX}/dev-victim/report", b"fence") == 0
            wait_for(lambda: _reports(live) >= reports, 10, what="the server's link got the report")
            sent = runtime.publisher.publish(f"{PREFIX}/dev-victim/desired", b"desired", 1, False)
            sent.wait_for_publish(10)
            victim.wait_for(b"desired")
            assert intruder.is_connected()  # it got in, with an id of its own
        finally:
            intruder.disconnect()
            intruder.loop_stop()
        assert [link._session for link in links] == connects, "a server connection was taken over"
        assert all(link.connected for link in links)
        assert not victim_cut.is_set(), "the victim device's connection was taken over"
    finally:
        victim.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_devices_client_id_is_its_certificates_cn(live_server, broker_process, tmp_path, protocol):
    # protection: `use_username_as_clientid`. Two connections of one certificate asking for two
    # different client ids get the same one, its CN: the second takes the first one's session over.
    broker = _broker_of(live_server, broker_process)
    dev = enroll_device(live_server, tmp_path / "dev", "dev-twice")
    first = mqtt_connect(broker, dev.cert_file, dev.key_file, client_id="dev-other", protocol=protocol)
    first_cut = threading.Event()
    first.on_disconnect = lambda *args: first_cut.set()
    second = mqtt_connect(broker, dev.cert_file, dev.key_file, client_id="anything-else", protocol=protocol)
    try:
        assert first_cut.wait(10), "one certificate held two client ids"
        assert second.is_connected()
    finally:
        for c in (first, second):
            c.disconnect()
            c.loop_stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_device_cannot_discard_the_servers_queued_reports(live_server, broker_process, tmp_path, protocol):
    # The server's consuming session is persistent: reports published while its link is away (a
    # restart) wait for it in the broker. An intruder connecting with that link's client id and a
    # clean start would make the broker discard the session and the reports queued in it.
    # protection: `use_username_as_clientid` (the intruder's clean start concerns its own session).
    live = live_server
    link = live.mqtt.link
    broker = _broker_of(live, broker_process)
    dev = enroll_device(live, tmp_path / "dev", "dev-reporting")
    attacker = enroll_device(live, tmp_path / "attacker", "dev-attacker")
    device = Listener(mqtt_connect(broker, dev.cert_file, dev.key_file))
    before = _reports(live)
    link.stop()
    try:
        for i in range(3):  # PUBACKed: the broker holds them for the server's session
            assert device.publish("fleet/v1/d/dev-reporting/report", f"queued-{i}".encode()) == 0
        intruder = mqtt_connect(broker, attacker.cert_file, attacker.key_file, client_id=link.client_id,
                                protocol=protocol)  # fmt: skip
        intruder.disconnect()
        intruder.loop_stop()
    finally:
        link.start()
    assert link.wait_connected(10)
    wait_for(lambda: _reports(live) >= before + 3, 10, what="the reports queued in the server's session")
    assert _reports(live) == before + 3
    device.close()
