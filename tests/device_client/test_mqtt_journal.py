"""The report journal (crash-safe, ordered, idempotent) and the MQTT link against a real Mosquitto
with mTLS: reports queued on disk while the broker is down and across a restart of the link arrive
in order, and leave the journal only after the broker acknowledged them."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_client.mqtt import MqttEndpointConfig, MqttLink, ReportJournal

TOPIC = "fleet/v1/d/dev-1/report"


def test_journal_orders_dedups_and_survives_garbage(tmp_path):
    j = ReportJournal(tmp_path / "outbox")
    for seq in (10, 2, 33):
        assert j.append(seq, TOPIC, json.dumps({"seq": seq}).encode())
    assert not j.append(2, TOPIC, b'{"other": 1}')  # a seq is journaled once
    (tmp_path / "outbox" / f"{7:020d}.json").write_text("{truncated")
    (tmp_path / "outbox" / "x.tmp").write_text("left by a crash")
    j = ReportJournal(tmp_path / "outbox")  # reopened after a "crash"
    assert not (tmp_path / "outbox" / "x.tmp").exists()
    pending = j.pending()
    assert [e.seq for e in pending] == [2, 10, 33]
    assert json.loads(pending[0].payload) == {"seq": 2}
    assert j.max_seq() == 33
    j.remove(10)
    assert [e.seq for e in j.pending()] == [2, 33]


def test_the_highest_acknowledged_seq_stays_the_floor_across_a_restart(tmp_path):
    """Once every report is acknowledged the journal is empty, yet a restart must not reuse a seq
    the server has seen (the state file may not have been saved with it: a full disk): the highest
    acknowledged seq stays behind as a marker, and only the newest marker is kept."""
    j = ReportJournal(tmp_path / "outbox")
    for seq in (4, 5, 6):
        j.append(seq, TOPIC, b"{}")
    for seq in (5, 4, 6):  # acknowledged in any order
        j.remove(seq)
    assert j.pending() == []
    assert j.max_seq() == 6
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == [f"{6:020d}.acked"]
    j = ReportJournal(tmp_path / "outbox")  # restarted
    assert j.max_seq() == 6
    assert j.pending() == []
    j.append(7, TOPIC, b"{}")
    assert j.max_seq() == 7
    j.remove(7)
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == [f"{7:020d}.acked"]


class Subscriber:
    """The server side: a persistent-session subscriber that records report seqs in arrival order."""

    def __init__(self, broker) -> None:
        self.seqs: list[int] = []
        self.got = threading.Condition()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fleet-test-sub", protocol=mqtt.MQTTv5)
        c.tls_set(
            ca_certs=str(broker.files.ca),
            certfile=str(broker.files.server_cert),
            keyfile=str(broker.files.server_key),
        )
        self.ready = threading.Event()
        c.on_connect = lambda cl, u, f, rc, p: (cl.subscribe(TOPIC, qos=1), self.ready.set())
        c.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        c.loop_start()
        self.client = c
        assert self.ready.wait(5)
        time.sleep(0.2)  # SUBACK

    def _on_message(self, client, userdata, msg) -> None:
        with self.got:
            self.seqs.append(json.loads(msg.payload)["seq"])
            self.got.notify_all()

    def wait(self, n: int, timeout: float = 15.0) -> list[int]:
        with self.got:
            assert self.got.wait_for(lambda: len(set(self.seqs)) >= n, timeout), self.seqs
            return list(self.seqs)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _link(broker, journal: ReportJournal) -> MqttLink:
    cert, key = broker.client_files("dev-1")
    config = MqttEndpointConfig(
        host="127.0.0.1",
        port=broker.port,
        ca_file=broker.files.ca,
        cert_file=cert,
        key_file=key,
        client_id="dev-1",
        reconnect_min_s=1,
        reconnect_max_s=1,
    )
    return MqttLink(config, journal)


def _report(seq: int) -> bytes:
    return json.dumps({"seq": seq}).encode()


@pytest.mark.mqtt
def test_a_puback_during_a_flush_cannot_deadlock(mosquitto, tmp_path):
    """paho calls on_publish holding its out-message mutex; a flush running at that moment (the
    worker reporting a phase) must not hold the link's lock while it waits for that mutex."""
    journal = ReportJournal(tmp_path / "outbox")
    journal.append(1, "fleet/v1/d/dev-1/report", _report(1))
    link = _link(mosquitto, journal)  # never started: the two threads stand for paho's and ours
    in_flush = threading.Event()
    pending = journal.pending
    journal.pending = lambda: (in_flush.set(), pending())[1]  # type: ignore[method-assign]
    mutex = link.client._out_message_mutex

    def network_thread() -> None:  # what paho does on a PUBACK
        with mutex:
            in_flush.wait(1.0)  # let the flush take whatever it takes before it publishes
            link._on_publish(link.client, None, 99, None, None)

    threads = [threading.Thread(target=network_thread, daemon=True)]
    threads[0].start()
    time.sleep(0.1)  # the network thread holds paho's mutex
    threads.append(threading.Thread(target=link._flush, daemon=True))
    threads[1].start()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads), "the flush and the PUBACK callback deadlocked"


@pytest.mark.mqtt
def test_reports_survive_broker_outage_and_restart_in_order(mosquitto, tmp_path):
    journal_dir = tmp_path / "outbox"
    sub = Subscriber(mosquitto)
    mosquitto.process.stop()  # broker down

    # the daemon runs while the broker is down, journals reports 1..3, and is restarted
    first = _link(mosquitto, ReportJournal(journal_dir))
    first.start()
    for seq in (1, 2, 3):
        first.publish_report(seq, TOPIC, _report(seq))
    assert not first.connected
    first.stop()
    assert [e.seq for e in ReportJournal(journal_dir).pending()] == [1, 2, 3]

    mosquitto.process.start()
    second = _link(mosquitto, ReportJournal(journal_dir))
    second.start()
    second.publish_report(4, TOPIC, _report(4))
    sub.client.reconnect()
    try:
        assert second.wait_connected(10)
        seqs = sub.wait(4)
        assert [s for i, s in enumerate(seqs) if s not in seqs[:i]] == [1, 2, 3, 4]

        def drained() -> bool:
            return second.pending_reports() == 0

        deadline = time.monotonic() + 10
        while not drained() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert drained()

        # a broker outage in the middle of a session: reports wait on disk, then arrive in order
        mosquitto.process.stop()
        deadline = time.monotonic() + 10
        while second.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not second.connected
        for seq in (5, 6):
            second.publish_report(seq, TOPIC, _report(seq))
        assert [e.seq for e in second.journal.pending()] == [5, 6]
        mosquitto.process.start()
        sub.client.reconnect()
        seqs = sub.wait(6, timeout=20)
        assert [s for i, s in enumerate(seqs) if s not in seqs[:i]] == [1, 2, 3, 4, 5, 6]
    finally:
        second.stop()
        sub.close()
