"""The server's MQTT link (paho-mqtt 2.x): mTLS client, shared subscriptions, per-topic callbacks.

It subscribes in ``on_connect`` (so every reconnect re-subscribes) to
``$share/fleet-server/fleet/v1/d/+/{report,health,presence}``, so several server replicas split
the device traffic (``Settings.shared_subscriptions``; a lone server with the embedded broker
subscribes without ``$share``, because Mosquitto 2.0 restores only plain subscriptions of a
persistent session after a broker restart). The session is persistent (MQTT 5
``clean_start=False`` with a session expiry) so QoS 1 messages that arrive while this replica
restarts are delivered when it returns. The consuming link acknowledges a message (PUBACK) only
once the ingest batch holding it is committed (or it was rejected as bad input): a crash of the
process at any point leaves the unwritten messages unacknowledged, and the broker delivers them
again (the ingest deduplicates by seq). MQTT 5's Receive Maximum (:data:`RECEIVE_MAXIMUM`) lets the
broker keep a fleet's worth of messages in flight meanwhile.
Incoming messages are handed to a callback without any parsing (one ``on_message`` for every
device topic; the ingest worker parses the topic anyway, so paho's per-topic matcher would only
cost time on the hottest path).

The server opens TWO links (:class:`server.mqtt.runtime.MqttRuntime`): this consuming one, and a
publish-only one (``subscribe=False``, clean session) for the outbox. On one connection the
broker's PUBACKs for the server's DesiredStates queue behind the flood of device reports those
very DesiredStates cause, so the outbox publishes no faster than the server reads reports; on
their own connection they come back at once (the 10,000-device fan-out, ``bench/fanout.py``).

Every failed connection attempt and lost connection is logged at WARNING with its reason
(rate-limited while it repeats), counted in ``fleet_mqtt_connection_failures_total{link,reason}``
and shown by ``/readyz`` (:mod:`device_client.linkstate`, shared with the device's link).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_client.linkstate import (
    Endpoint,
    LinkFailure,
    LinkState,
    ReasonClient,
    describe_connack,
    describe_disconnect,
    describe_error,
)
from device_client.protocol.topics import server_subscriptions
from server.config import Settings
from server.metrics import Metrics
from server.mqtt.identity import ClientIdentity

log = logging.getLogger(__name__)

#: (topic, payload, received at, ack): ``ack()`` sends the message's PUBACK; call it once the
#: message is settled (written or rejected), never before
OnMessage = Callable[[str, bytes, datetime, Callable[[], object]], None]

#: QoS 1 messages the broker may send the consuming link before it acknowledges any (MQTT 5
#: Receive Maximum, the protocol's largest). The link acknowledges a message only after the
#: ingest batch holding it is committed, so the window must hold what arrives during a batch at
#: fleet scale; Mosquitto honours it for MQTT 5 clients instead of its max_inflight_messages.
RECEIVE_MAXIMUM = 65535


_PUBACK = 0x40


class CoalescingClient(ReasonClient):
    """A paho client that writes a run of queued PUBACKs with one ``send``.

    paho writes every queued packet with its own ``socket.send``: on TLS one record, one
    encryption and one system call per PUBACK, and as many reads for the broker. The server's
    consuming link acknowledges every device report and health window (tens of thousands a
    minute in a large rollout), so before paho writes, consecutive PUBACKs waiting at the head of
    its queue are joined into one packet. PUBACKs carry no completion callback, so nothing but
    the number of writes changes. This relies on paho's ``_out_packet`` queue of packet dicts
    (paho-mqtt 2.x); if that ever changes shape, the join is skipped and paho writes as before.
    """

    def _packet_write(self) -> mqtt.MQTTErrorCode:
        queue = getattr(self, "_out_packet", None)
        if queue is not None and len(queue) > 1:
            with contextlib.suppress(KeyError, TypeError, IndexError):
                self._join_pubacks(queue)
        return super()._packet_write()

    @staticmethod
    def _join_pubacks(queue: Any) -> None:
        n = 0  # length of the run of unstarted PUBACKs at the head (by index: others may append)
        while n < len(queue) and queue[n]["command"] == _PUBACK and queue[n]["pos"] == 0:
            n += 1
        if n > 1:
            data = b"".join([queue.popleft()["packet"] for _ in range(n)])
            queue.appendleft(_puback_packet(data))


def _puback_packet(data: bytes) -> dict[str, Any]:
    return {"command": _PUBACK, "mid": 0, "qos": 0, "pos": 0, "to_process": len(data), "packet": data,
            "info": None}  # fmt: skip


class MqttLink:
    """One MQTT connection of the server. ``on_message=None``: publish only (no subscriptions, a
    clean session: what it has in flight when it drops is still pending in the outbox).

    It presents ``identity``'s certificate and connects with its CN as the client id (the broker
    makes it so anyway: see :mod:`server.mqtt.identity`)."""

    def __init__(
        self,
        settings: Settings,
        on_message: OnMessage | None,
        *,
        identity: ClientIdentity,
        shared: bool = True,
        metrics: Metrics | None = None,
        name: str = "consume",
    ) -> None:
        """``name``: the link's role in logs, ``/readyz`` and the failure counter's ``link`` label."""
        self.settings = settings
        self.on_message = on_message
        self.shared = shared
        self.client_id = identity.cn
        self.name = name
        self.metrics = metrics
        host, port = settings.mqtt_connect_endpoint()
        self.state = LinkState(
            name,
            Endpoint(host, port, str(settings.mqtt_ca_file), f"the server identity {identity.cn}"),
            logger=log,
            on_failure=self._count_failure,
        )
        self._connected = threading.Event()
        self._stopping = False
        self.subscribed = threading.Event()
        #: bumped on every connect: acknowledgements are only sent on the connection they belong to
        self._session = 0
        c = CoalescingClient(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=on_message is not None,  # PUBACK after the commit (see OnMessage)
        )
        assert settings.mqtt_ca_file is not None  # Settings fills it in
        c.tls_set_context(identity.ssl_context(settings.mqtt_ca_file))
        c.max_inflight_messages_set(200)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=15)
        c.on_pre_connect = lambda client, userdata: self.state.attempt()
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        if on_message is not None:
            c.on_message = self._on_device_message
        self.client = c

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        host, port = self.settings.mqtt_connect_endpoint()
        props = Properties(PacketTypes.CONNECT)
        persistent = self.on_message is not None
        props.SessionExpiryInterval = 3600 if persistent else 0
        if persistent:
            props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.client.connect_async(host, port, keepalive=30, clean_start=not persistent, properties=props)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()
        self.state.stopped()

    def status(self) -> dict[str, Any]:
        """The link's state, last error and failures per reason (``/readyz``)."""
        return {"client_id": self.client_id, **self.state.snapshot()}

    def _count_failure(self, failure: LinkFailure) -> None:
        if self.metrics is not None:
            self.metrics.inc(
                "fleet_mqtt_connection_failures_total",
                help="failed MQTT connection attempts and lost connections of the server, by reason",
                link=self.name,
                reason=failure.reason,
            )

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout) and self.subscribed.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info

    # -- paho callbacks (network thread) -----------------------------------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: mqtt.ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self.state.failed(describe_connack(reason_code, self.state.endpoint))
            return
        self.state.connected()
        log.info("MQTT connected as %s (session present: %s)", self.client_id, flags.session_present)
        self._session += 1
        self._connected.set()
        if self.on_message is None:
            self.subscribed.set()  # publish only: nothing to wait for
            return
        client.subscribe([(f, 1) for f in server_subscriptions(self.shared)])

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[mqtt.ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("MQTT subscription refused: %s", failed)
        else:
            self.subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: mqtt.ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        self.subscribed.clear()
        if self._stopping:
            log.info("MQTT disconnected: %s", reason_code)
            return
        socket_error = self.client.socket_error
        failure = describe_disconnect(
            reason_code, flags.is_disconnect_packet_from_server, socket_error, self.state.endpoint
        )
        self.state.closed(failure)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        """A connection attempt raised (paho retries with backoff): log, count and show why."""
        exc = self.client.connect_error or OSError("connection failed")
        self.state.failed(describe_error(exc, self.state.endpoint))

    def _on_device_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        assert self.on_message is not None
        ack = partial(self._ack, self._session, msg.mid, msg.qos)
        self.on_message(msg.topic, bytes(msg.payload), datetime.now(UTC), ack)  # bytes: the same object

    def _ack(self, session: int, mid: int, qos: int) -> None:
        """PUBACK ``mid`` if the connection that delivered it is still the current one: after a
        reconnect the broker delivers unacknowledged messages again (and may reuse packet ids)."""
        if session == self._session and qos > 0:
            self.client.ack(mid, qos)
