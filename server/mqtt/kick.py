"""Cut a decommissioned device's open MQTT connection.

Revoking a certificate (the CRL the broker loads) stops new connections, but TLS is checked at
the handshake, so a connection already open at decommission time would stay up until the device
reconnects. The server takes the device's session over: the broker binds every client id to the
certificate's CN, so the server issues itself a certificate with the device's CN (fleet CA, valid
:data:`TAKEOVER_LIFETIME`, its key discarded after use) and connects with it (MQTT 5 clean start,
no session kept), which makes the broker close the device's connection ("session taken over",
MQTT 5 reason 0x8E), then leaves. The device's reconnect meets the new CRL.
The broker's CRL reload is asynchronous, so the takeover is done twice, the second time after
:data:`SECOND_KICK_S` (a device that reconnected in between, before the reload, is cut again). With
an external broker, its CRL must be reloaded by its operator; the takeover still cuts the open
connection.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from server.config import Settings
from server.mqtt.bridge import MqttLink
from server.mqtt.identity import ClientIdentity
from server.trust.pki import FleetCA

log = logging.getLogger(__name__)

#: delay of the first takeover after the CRL was written, and of the second after the first
FIRST_KICK_S = 0.2
SECOND_KICK_S = 3.0
#: validity of the certificate a takeover connects with
TAKEOVER_LIFETIME = timedelta(minutes=5)


def take_over_session(settings: Settings, ca: FleetCA, client_id: str, timeout: float = 5.0) -> bool:
    """Connect as ``client_id`` and leave at once: the broker closes any connection holding that
    client id. True if the broker accepted the connection.

    A publish-only :class:`~server.mqtt.bridge.MqttLink` is exactly that connection: clean
    start, no session kept; its identity is a fresh certificate for ``client_id``."""
    identity = ClientIdentity.issue(ca, client_id, TAKEOVER_LIFETIME)
    link = MqttLink(settings, None, identity=identity, shared=False)
    link.start()
    try:
        return link.wait_connected(timeout)
    finally:
        link.stop()


def kick_device(settings: Settings, ca: FleetCA, device_id: str) -> threading.Thread:
    """Take ``device_id``'s session over now and again after :data:`SECOND_KICK_S`, on a
    background thread (decommission answers at once)."""

    def run() -> None:
        for delay in (FIRST_KICK_S, SECOND_KICK_S):
            time.sleep(delay)
            try:
                if take_over_session(settings, ca, device_id):
                    log.info("cut any open MQTT connection of decommissioned device %s", device_id)
            except Exception:  # never let a kick take the server down
                log.exception("cutting %s's MQTT connection failed", device_id)

    t = threading.Thread(target=run, name=f"kick-{device_id}", daemon=True)
    t.start()
    return t
