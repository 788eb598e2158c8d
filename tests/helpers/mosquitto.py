"""Pytest plugin: a private Mosquitto on an ephemeral port from the generated fleet config
(mTLS with client certificates, ACL on the certificate CN). Never uses port 1883."""

from __future__ import annotations

import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from server.mqtt.broker import (
    BrokerFiles,
    MosquittoProcess,
    free_port,
    issue_client_files,
    write_broker_config,
)
from server.trust.pki import FleetCA


@dataclass
class Broker:
    ca: FleetCA
    files: BrokerFiles
    process: MosquittoProcess
    workdir: Path
    host: str = "127.0.0.1"

    @property
    def port(self) -> int:
        return self.files.port

    def client_files(self, cn: str) -> tuple[Path, Path]:
        """(cert, key) of a fresh client certificate for ``cn`` issued by this broker's CA."""
        cert, key = self.workdir / f"{cn}.crt", self.workdir / f"{cn}.key"
        if not cert.exists():
            issue_client_files(self.ca, cn, cert, key)
        return cert, key


def start_broker(ca: FleetCA, workdir: Path) -> Broker:
    files = write_broker_config(ca, workdir / "broker", port=free_port())
    return Broker(ca=ca, files=files, process=MosquittoProcess(files).start(), workdir=workdir)


class ConnectFailed(Exception):
    """The connection did not come up. ``kind`` says how, so a test can tell a refusal from an
    outage: ``"tls"`` (the TLS handshake failed; ``tls_reason`` is OpenSSL's reason, e.g.
    ``TLSV1_ALERT_UNKNOWN_CA`` for the broker's alert, or ``TLS_EOF`` when it closed the TLS
    connection without one),
    ``"socket"`` (no TCP connection: nothing listening, reset), ``"connack"`` (the broker answered
    CONNECT with a failure reason code), ``"closed"`` (the connection dropped without a TLS alert
    or a CONNACK) or ``"timeout"`` (no answer in time)."""

    def __init__(self, kind: str, detail: str, tls_reason: str | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.tls_reason = tls_reason


#: ``tls_reason`` of a TLS connection the broker closed without an alert (ssl.SSLEOFError)
TLS_EOF = "EOF"
_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")


def mqtt_connect(
    broker: Broker,
    cert: Path,
    key: Path,
    *,
    ca_file: Path | None = None,
    client_id: str | None = None,
    timeout: float = 20.0,
    protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5,
) -> mqtt.Client:
    """A connected, looping paho client (MQTT 5 unless ``protocol`` says otherwise; a clean start)
    using ``cert``/``key``; raises ConnectFailed (with its ``kind``) if the connection does not
    come up."""
    done = threading.Event()
    result: dict[str, object] = {}
    socket_errors: list[str] = []

    def on_connect(client, userdata, flags, reason_code, properties):
        result["rc"] = result["connack"] = reason_code
        done.set()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or cert.stem, protocol=protocol
    )
    client.tls_set(ca_certs=str(ca_file or broker.files.ca), certfile=str(cert), keyfile=str(key))

    def on_disconnect(client, userdata, flags, reason_code, properties):
        result.setdefault("rc", reason_code)
        result["disconnected"] = True
        done.set()

    def on_log(client, userdata, level, message):
        # With TLS 1.3 the broker checks the client certificate after the client's side of the
        # handshake is done: its alert arrives as the first read fails, which paho only logs.
        if level == mqtt.MQTT_LOG_ERR:
            socket_errors.append(message)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_log = on_log
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except ssl.SSLError as exc:
        raise ConnectFailed("tls", str(exc), exc.reason) from exc
    except OSError as exc:
        raise ConnectFailed("socket", str(exc)) from exc
    client.loop_start()
    answered = done.wait(timeout)
    rc = result.get("rc")
    if answered and not result.get("disconnected") and not getattr(rc, "is_failure", True):
        client.on_log = None
        return client
    client.loop_stop()
    client.disconnect()
    if not answered:
        raise ConnectFailed("timeout", f"no CONNACK within {timeout} s")
    for message in socket_errors:
        if m := _SSL_REASON.search(message):
            raise ConnectFailed("tls", message, m.group(1))
        if "EOF occurred in violation of protocol" in message:  # ssl.SSLEOFError
            raise ConnectFailed("tls", message, TLS_EOF)
    if "connack" in result:
        raise ConnectFailed("connack", str(result["connack"]))
    raise ConnectFailed("closed", "; ".join(socket_errors) or str(rc))


def tls_refusal(broker: Broker, cert: Path, key: Path, timeout: float = 10.0) -> str | None:
    """The broker's verdict on ``cert`` in the TLS handshake alone: None if it completes, else
    OpenSSL's reason for the broker's alert (``TLSV1_ALERT_UNKNOWN_CA``,
    ``SSLV3_ALERT_CERTIFICATE_REVOKED``, ...). Raises ConnectFailed (``socket``/``timeout``/``closed``)
    for anything that is not a verdict, such as a broker not listening.

    Pinned to TLS 1.2, where the broker checks the client certificate *before* its Finished, so its
    alert is part of the handshake. Under TLS 1.3 it checks it after the client's side is done and
    the alert races the client's first write (it often arrives as a bare EOF or a reset instead)."""
    ctx = ssl.create_default_context(cafile=str(broker.files.ca))
    ctx.check_hostname = False
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    try:
        raw = socket.create_connection((broker.host, broker.port), timeout=timeout)
    except OSError as exc:
        raise ConnectFailed("socket", str(exc)) from exc
    try:
        with ctx.wrap_socket(raw, server_hostname=broker.host) as tls:
            tls.settimeout(timeout)
            return None
    except ssl.SSLError as exc:
        if exc.reason is None or isinstance(exc, ssl.SSLEOFError):
            raise ConnectFailed("closed", str(exc)) from exc
        return str(exc.reason)
    except TimeoutError as exc:
        raise ConnectFailed("timeout", f"no TLS handshake within {timeout} s") from exc
    except OSError as exc:
        raise ConnectFailed("closed", str(exc)) from exc


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[[FleetCA], Broker]]:
    """Start a private broker trusting the given CA; stopped at teardown."""
    started: list[Broker] = []

    def start(ca: FleetCA) -> Broker:
        broker = start_broker(ca, tmp_path / f"mqtt{len(started)}")
        started.append(broker)
        return broker

    yield start
    for b in started:
        b.process.stop()


@pytest.fixture
def mosquitto(broker_factory, tmp_path: Path) -> Broker:
    """A private broker with its own fresh fleet CA."""
    return broker_factory(FleetCA(tmp_path / "mqtt-ca"))


def subscribe_sync(client: mqtt.Client, topic: str, qos: int = 1, timeout: float = 20.0) -> list:
    """Subscribe and wait for the SUBACK (so a publish right after cannot overtake it)."""
    acks: dict[int, list] = {}
    cond = threading.Condition()
    previous = client.on_subscribe

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        with cond:
            acks[mid] = list(reason_codes)
            cond.notify_all()

    client.on_subscribe = on_subscribe
    try:
        _, mid = client.subscribe(topic, qos=qos)
        with cond:
            if not cond.wait_for(lambda: mid in acks, timeout):
                raise TimeoutError(f"no SUBACK for {topic}")
            return acks[mid]
    finally:
        client.on_subscribe = previous
