"""The broker actions the domain triggers (:class:`server.context.BrokerControl`), on the
Mosquitto of this host: re-read the CRL (:mod:`server.mqtt.reload`) and cut a decommissioned
device's open connection (:mod:`server.mqtt.kick`)."""

from __future__ import annotations

from dataclasses import dataclass

from server.config import Settings
from server.mqtt.broker import CONF_FILE
from server.mqtt.kick import kick_device
from server.mqtt.reload import reload_local_brokers
from server.trust.pki import FleetCA


@dataclass(frozen=True)
class LocalBroker:
    """The local brokers running the configuration generated in ``settings.broker_dir``."""

    settings: Settings
    ca: FleetCA

    def reload_crl(self) -> int:
        return reload_local_brokers(self.settings.broker_dir / CONF_FILE)

    def cut(self, device_id: str) -> None:
        kick_device(self.settings, self.ca, device_id)
