"""The MQTT side of a running server: the consuming link and the ingest worker, the publish-only
link and the outbox publisher, started together (two connections: see :mod:`server.mqtt.bridge`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.mqtt.bridge import MqttLink, server_client_id
from server.mqtt.handlers import IngestWorker
from server.mqtt.outbox import OutboxPublisher

if TYPE_CHECKING:
    from server.context import ServerContext


@dataclass
class MqttRuntime:
    link: MqttLink
    publisher: MqttLink
    ingest: IngestWorker
    outbox: OutboxPublisher

    @classmethod
    def start(cls, ctx: ServerContext) -> MqttRuntime:
        ingest = IngestWorker(ctx, ctx.metrics)
        link = MqttLink(ctx.settings, ingest.submit, shared=ctx.settings.shared_subscriptions)
        publisher = MqttLink(ctx.settings, None, client_id=f"{server_client_id(ctx.settings)}-pub")
        outbox = OutboxPublisher(ctx.db, publisher, ctx.metrics)
        ingest.start()
        outbox.start()
        publisher.start()
        link.start()
        return cls(link=link, publisher=publisher, ingest=ingest, outbox=outbox)

    def wait_connected(self, timeout: float) -> bool:
        """Both connections up and the consuming one subscribed."""
        return self.link.wait_connected(timeout) and self.publisher.wait_connected(timeout)

    def stop(self) -> None:
        self.link.stop()
        self.outbox.stop()
        self.publisher.stop()
        self.ingest.stop()
