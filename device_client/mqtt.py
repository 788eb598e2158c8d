"""The device's MQTT link (paho-mqtt 2.x) and its on-disk report journal.

Connection policy:

* MQTT 5, ``CallbackAPIVersion.VERSION2``, mTLS with the device certificate and the fleet CA
  (the broker derives the username from the certificate CN, i.e. the device id);
* persistent session: ``clean_start=False`` with a session expiry of ``session_expiry_s`` (a
  week by default), client id = device id, so QoS 1 desired states published while the device was
  offline are waiting for it;
* last will: the retained, QoS 1 ``offline`` Presence; on connect the link publishes the retained
  ``online`` Presence; a clean :meth:`MqttLink.stop` publishes ``offline`` itself (a clean
  disconnect suppresses the will);
* subscriptions are (re)made in ``on_connect`` with per-topic callbacks
  (``message_callback_add``); a callback that raises is logged and never kills the network thread;
* reconnects are paho's own, with exponential backoff between ``reconnect_min_s`` and
  ``reconnect_max_s``; the first connection is attempted the same way (``connect_async``), so a
  device that boots before its broker is reachable simply keeps trying;
* every failed attempt and lost connection is logged at WARNING with its reason (TLS verify
  failure and which certificate, refused, not authorised, DNS, timeout; rate-limited while it
  repeats, :mod:`device_client.linkstate`); :meth:`MqttLink.status` is the state and the last
  error (``GET /v1/health``), also kept in ``<data dir>/mqtt.json`` for ``fleet device status``.

Report journal (:class:`ReportJournal`): every report is written to ``<dir>/<seq>.json`` (temp
file, fsync, ``os.replace``, directory fsync) *before* it is handed to paho, and the file is removed
only when the broker's PUBACK arrives. On every (re)connect the entries not yet in flight in this
process are published in seq order (paho itself re-sends what it had in flight, in order, before
them). After a restart the whole journal is re-sent, so a report whose PUBACK was lost may arrive
twice: the server deduplicates by ``seq``. Nothing is lost across a crash or a broker outage.
The acknowledged report with the highest seq is not deleted but renamed ``<seq>.acked``: it keeps
the seq floor (:meth:`ReportJournal.max_seq`) on disk even when the state file could not be saved
with it (a full disk), so a restart never reuses a seq the server has already seen (it would drop
the new report as a duplicate). A rename needs no free space.
Health windows are QoS 0 and not journaled (a lost window is a gap, not a lie).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .linkstate import (
    Endpoint,
    LinkState,
    ReasonClient,
    describe_connack,
    describe_disconnect,
    describe_error,
)
from .protocol.fsutil import atomic_write

log = logging.getLogger(__name__)

MessageCallback = Callable[[str, bytes], None]

#: the link's last state and error, in the data directory (``fleet device status`` reads it)
MQTT_STATUS_FILE = "mqtt.json"


@dataclass(frozen=True)
class JournalEntry:
    seq: int
    topic: str
    payload: bytes


class ReportJournal:
    """A directory of not-yet-acknowledged reports, one file per seq (crash-safe)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        for tmp in self.dir.glob("*.tmp"):  # a crash mid-append leaves only an unreferenced temp
            tmp.unlink(missing_ok=True)
        #: the highest acknowledged seq, kept as ``<seq>.acked`` (the seq floor across restarts)
        self._acked = max(self._seqs("*.acked"), default=0)

    def _seqs(self, pattern: str) -> list[int]:
        return [int(p.stem) for p in self.dir.glob(pattern) if p.stem.isascii() and p.stem.isdigit()]

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:020d}.json"

    def append(self, seq: int, topic: str, payload: bytes) -> bool:
        """Durably store one report; False (and no change) if ``seq`` is already journaled."""
        path = self._path(seq)
        with self._lock:
            if path.exists():
                return False
            doc = json.dumps({"seq": seq, "topic": topic, "payload": payload.decode("utf-8")}).encode()
            atomic_write(path, doc, mode=0o600)
            return True

    def remove(self, seq: int) -> None:
        """The broker acknowledged ``seq``: drop it from the journal, keeping the highest
        acknowledged seq as the ``.acked`` marker."""
        with self._lock:
            path = self._path(seq)
            if seq <= self._acked:
                path.unlink(missing_ok=True)
                return
            try:
                os.replace(path, path.with_suffix(".acked"))
            except FileNotFoundError:
                return
            old, self._acked = self._acked, seq
            if old:
                self._path(old).with_suffix(".acked").unlink(missing_ok=True)

    def pending(self) -> list[JournalEntry]:
        """Every journaled report in seq order (unreadable files are logged and dropped)."""
        entries: list[JournalEntry] = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                doc = json.loads(path.read_bytes())
                entries.append(JournalEntry(int(doc["seq"]), str(doc["topic"]), doc["payload"].encode()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("dropping unreadable journal entry %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
        return sorted(entries, key=lambda e: e.seq)

    def max_seq(self) -> int:
        """The highest seq journaled or acknowledged: no new report may take it or a lower one."""
        with self._lock:
            return max([*self._seqs("*.json"), self._acked])


@dataclass(frozen=True)
class MqttEndpointConfig:
    host: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_id: str
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86400
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0


class MqttLink:
    """One device's connection: journaled reports, plain publishes, per-topic subscriptions."""

    def __init__(
        self,
        config: MqttEndpointConfig,
        journal: ReportJournal,
        *,
        will: tuple[str, bytes] | None = None,
        on_connected: Callable[[MqttLink], object] | None = None,
        status_file: Path | None = None,
    ) -> None:
        """``status_file``: where to keep the link state (each change of state or error)."""
        self.config = config
        self.journal = journal
        self.on_connected = on_connected
        self._subs: dict[str, tuple[int, MessageCallback]] = {}
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # paho mid -> report seq
        self._handed: set[int] = set()  # report seqs handed to paho in this process
        self._connected = threading.Event()
        self._stopping = False
        self.status_file = status_file
        self.state = LinkState(
            "link",
            Endpoint(config.host, config.port, str(config.ca_file), str(config.cert_file)),
            logger=log,
            on_change=self._record_state if status_file is not None else None,
        )
        client = ReasonClient(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=True,
        )
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(config.ca_file))
        ctx.load_cert_chain(str(config.cert_file), str(config.key_file))
        client.tls_set_context(ctx)
        client.reconnect_delay_set(
            min_delay=max(1, int(config.reconnect_min_s)), max_delay=max(1, int(config.reconnect_max_s))
        )
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_pre_connect = lambda c, u: self.state.attempt()
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_unexpected
        self.client = client

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        self.client.connect_async(
            self.config.host,
            self.config.port,
            keepalive=self.config.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self.client.loop_start()

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish ``final`` (e.g. the offline presence) if connected, then disconnect cleanly."""
        self._stopping = True
        if final is not None and self._connected.is_set():
            with contextlib.suppress(Exception):
                info = self.client.publish(final[0], final[1], qos=1, retain=True)
                info.wait_for_publish(timeout)
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        self.state.stopped()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def loop_alive(self) -> bool:
        """Whether paho's network thread runs (started and not ended): the service watchdog's check."""
        thread = getattr(self.client, "_thread", None)
        return thread is not None and thread.is_alive()

    def status(self) -> dict[str, Any]:
        """State (``connecting``, ``connected``, ``disconnected``, ``stopped``), since when, the
        last error (reason, message, time) and failures per reason."""
        return self.state.snapshot()

    def _record_state(self, snapshot: dict[str, Any]) -> None:
        assert self.status_file is not None
        doc = {**snapshot, "pid": os.getpid()}
        try:
            atomic_write(self.status_file, json.dumps(doc, indent=1).encode(), mode=0o600)
        except OSError as exc:  # a full disk must not take the network thread down
            log.debug("cannot write %s: %s", self.status_file, exc)

    # ---------------------------------------------------------------- subscriptions

    def subscribe(self, topic: str, callback: MessageCallback, qos: int = 1) -> None:
        """Register ``callback(topic, payload)``; subscribed now if connected and at every connect."""

        def dispatch(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                callback(msg.topic, bytes(msg.payload))
            except Exception:
                log.exception("handler for %s failed", msg.topic)

        with self._lock:
            self._subs[topic] = (qos, callback)
        self.client.message_callback_add(topic, dispatch)
        if self._connected.is_set():
            self.client.subscribe(topic, qos=qos)

    def _on_unexpected(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        log.warning("message on unexpected topic %s ignored", msg.topic)

    # ---------------------------------------------------------------- publishing

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> bool:
        """A plain publish (not journaled); False when not connected (QoS 0 is then dropped)."""
        if not self._connected.is_set() and qos == 0:
            return False
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def publish_report(self, seq: int, topic: str, payload: bytes) -> None:
        """Journal the report, then send it (now if connected, else at the next connect)."""
        self.journal.append(seq, topic, payload)
        self.flush()

    def flush(self) -> None:
        """Send the journaled reports not sent yet, if connected (else the next connect does)."""
        if self._connected.is_set():
            self._flush()

    def _flush(self) -> None:
        """Hand every journaled report not yet handed to paho over, in seq order."""
        # Lock order: paho's out-message mutex, then ours. paho's network thread holds that mutex
        # while it calls _on_publish (which takes self._lock); taking ours first and then calling
        # client.publish (which takes paho's) deadlocked the worker and the network thread whenever
        # a PUBACK arrived during a flush. It is an RLock, so publish re-enters it.
        with self.client._out_message_mutex, self._lock:
            for entry in self.journal.pending():
                if entry.seq in self._handed:
                    continue
                info = self.client.publish(entry.topic, entry.payload, qos=1)
                if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    log.warning("could not queue report %d: rc=%s", entry.seq, info.rc)
                    break
                self._handed.add(entry.seq)
                self._inflight[info.mid] = entry.seq
                # PUBACK may already have been processed; while disconnected (NO_CONN) paho keeps
                # the message for the next connection and is_published() would raise
                if info.rc == mqtt.MQTT_ERR_SUCCESS and info.is_published():
                    self._acked(info.mid)

    def _acked(self, mid: int) -> None:
        seq = self._inflight.pop(mid, None)
        if seq is not None:
            self.journal.remove(seq)

    def pending_reports(self) -> int:
        return len(self.journal.pending())

    # ---------------------------------------------------------------- paho callbacks

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if reason_code.is_failure:
            self.state.failed(describe_connack(reason_code, self.state.endpoint))
            return
        self.state.connected()
        log.info(
            "MQTT connected to %s:%d (session present: %s)",
            self.config.host,
            self.config.port,
            getattr(flags, "session_present", None),
        )
        with self._lock:
            subs = dict(self._subs)
        for topic, (qos, _) in subs.items():
            client.subscribe(topic, qos=qos)
        self._connected.set()
        if self.on_connected is not None:
            try:
                self.on_connected(self)
            except Exception:
                log.exception("on_connected hook failed")
        self._flush()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self._connected.clear()
        if not self._stopping:
            from_broker = bool(getattr(flags, "is_disconnect_packet_from_server", False))
            socket_error = self.client.socket_error
            failure = describe_disconnect(reason_code, from_broker, socket_error, self.state.endpoint)
            self.state.closed(failure)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """A connection attempt raised (paho retries with backoff): log and show why."""
        exc = self.client.connect_error or OSError("connection failed")
        self.state.failed(describe_error(exc, self.state.endpoint))

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        with self._lock:
            self._acked(mid)
