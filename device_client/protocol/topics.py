"""MQTT topics of the fleet protocol (docs/architecture.md, "Wire protocol").

Every device topic is ``fleet/v1/d/{device_id}/{kind}``. The server consumes the device-to-server
kinds through a shared subscription so that several replicas split the load.
"""

from __future__ import annotations

import re
from enum import StrEnum

from .errors import InvalidTopic

PREFIX = "fleet/v1/d"
#: device ids are DNS-label-like; they are also the CN of the device certificate and the MQTT
#: username the broker derives from it, so they must never contain ``+``, ``#`` or ``/``.
DEVICE_ID_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"
#: always ``fullmatch``: with ``match``, ``$`` also matches before a final newline ("dev-a\n")
DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN, re.ASCII)
#: the shared-subscription group of the server replicas
SERVER_SHARE_GROUP = "fleet-server"
#: CN/username of the server's own MQTT client certificate. It contains ``_``, which no device id
#: may contain, so a device can never enroll under the server's identity.
SERVER_MQTT_USERNAME = "fleet_server"


class TopicKind(StrEnum):
    desired = "desired"  # server -> device, QoS 1, retained
    report = "report"  # device -> server, QoS 1
    health = "health"  # device -> server, QoS 0/1
    presence = "presence"  # device -> server, QoS 1, retained, also the LWT


DEVICE_TO_SERVER = (TopicKind.report, TopicKind.health, TopicKind.presence)


def is_valid_device_id(device_id: str) -> bool:
    return isinstance(device_id, str) and DEVICE_ID_RE.fullmatch(device_id) is not None


def device_topic(device_id: str, kind: TopicKind | str) -> str:
    """The topic of one device and kind; raises :class:`InvalidTopic` for a bad device id."""
    if not is_valid_device_id(device_id):
        raise InvalidTopic(f"invalid device id {device_id!r}")
    return f"{PREFIX}/{device_id}/{TopicKind(kind).value}"


def parse_topic(topic: str) -> tuple[str, TopicKind]:
    """Split ``fleet/v1/d/{device_id}/{kind}`` into its device id and kind."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != PREFIX:
        raise InvalidTopic(f"not a fleet device topic: {topic!r}")
    device_id, kind = parts[3], parts[4]
    if not is_valid_device_id(device_id):
        raise InvalidTopic(f"invalid device id in topic: {topic!r}")
    try:
        return device_id, TopicKind(kind)
    except ValueError:
        raise InvalidTopic(f"unknown topic kind {kind!r}") from None


def server_subscriptions(shared: bool = True) -> list[str]:
    """Topic filters the server subscribes to (shared subscriptions when ``shared``)."""
    filters = [f"{PREFIX}/+/{kind.value}" for kind in DEVICE_TO_SERVER]
    if shared:
        return [f"$share/{SERVER_SHARE_GROUP}/{f}" for f in filters]
    return filters
