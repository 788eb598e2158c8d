"""Pytest plugin: a private Mosquitto on an ephemeral port from the generated fleet config
(mTLS with client certificates, ACL on the certificate CN). Never uses port 1883."""

from __future__ import annotations

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
    pass


def mqtt_connect(
    broker: Broker,
    cert: Path,
    key: Path,
    *,
    ca_file: Path | None = None,
    client_id: str | None = None,
    timeout: float = 20.0,
) -> mqtt.Client:
    """A connected, looping paho client (MQTT 5) using ``cert``/``key``; raises ConnectFailed if the
    broker refuses the TLS handshake or the CONNECT."""
    done = threading.Event()
    result: dict[str, object] = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        result["rc"] = reason_code
        done.set()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or cert.stem, protocol=mqtt.MQTTv5
    )
    client.tls_set(ca_certs=str(ca_file or broker.files.ca), certfile=str(cert), keyfile=str(key))

    def on_disconnect(client, userdata, flags, reason_code, properties):
        result.setdefault("rc", reason_code)
        result["disconnected"] = True
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise ConnectFailed(f"TLS handshake failed: {exc}") from exc
    client.loop_start()
    if not done.wait(timeout) or result.get("disconnected") or getattr(result.get("rc"), "is_failure", True):
        client.loop_stop()
        client.disconnect()
        raise ConnectFailed(f"CONNECT refused: {result.get('rc')}")
    return client


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
