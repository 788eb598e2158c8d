"""Cut a decommissioned device's open MQTT connection.

Revoking a certificate (the CRL the broker loads) stops new connections, but TLS is checked at
the handshake, so a connection already open at decommission time would stay up until the device
reconnects. The server takes the device's session over: it connects with the device's client id
(its own identity and ACL; MQTT 5 clean start, no session kept), which makes the broker close the
device's connection ("session taken over", MQTT 5 reason 0x8E), then leaves. The device's
reconnect meets the new CRL. The broker's CRL reload is asynchronous, so the takeover is done
twice, the second time after :data:`SECOND_KICK_S` (a device that reconnected in between, before the
reload, is cut again). With an external broker, its CRL must be reloaded by its operator; the
takeover still cuts the open connection.
"""

from __future__ import annotations

import logging
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from server.config import Settings

log = logging.getLogger(__name__)

#: seconds after the first takeover to take the session over again
FIRST_KICK_S = 0.2
SECOND_KICK_S = 3.0


def take_over_session(settings: Settings, client_id: str, timeout: float = 5.0) -> bool:
    """Connect as ``client_id`` with the server's identity and leave at once: the broker closes
    any connection holding that client id. True if the broker accepted the connection."""
    done = threading.Event()
    accepted: list[bool] = []

    def on_connect(
        client: mqtt.Client, userdata: object, flags: object, rc: mqtt.ReasonCode, props: object
    ) -> None:
        accepted.append(not rc.is_failure)
        done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.tls_set(
        ca_certs=str(settings.mqtt_ca_file),
        certfile=str(settings.mqtt_cert_file),
        keyfile=str(settings.mqtt_key_file),
    )
    c.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    host, port = settings.mqtt_connect_endpoint()
    try:
        c.connect(host, port, keepalive=10, clean_start=True, properties=props)
    except (OSError, ValueError) as exc:
        log.info("cannot reach the broker to cut %s's connection: %s", client_id, exc)
        return False
    c.loop_start()
    try:
        done.wait(timeout)
        if accepted and accepted[0]:
            c.disconnect()
        return bool(accepted and accepted[0])
    finally:
        c.loop_stop()


def kick_device(settings: Settings, device_id: str) -> threading.Thread:
    """Take ``device_id``'s session over now and again after :data:`SECOND_KICK_S`, on a
    background thread (decommission answers at once)."""

    def run() -> None:
        stop = threading.Event()
        for delay in (FIRST_KICK_S, SECOND_KICK_S):
            stop.wait(delay)
            try:
                if take_over_session(settings, device_id):
                    log.info("cut any open MQTT connection of decommissioned device %s", device_id)
            except Exception:  # never let a kick take the server down
                log.exception("cutting %s's MQTT connection failed", device_id)

    t = threading.Thread(target=run, name=f"kick-{device_id}", daemon=True)
    t.start()
    return t
