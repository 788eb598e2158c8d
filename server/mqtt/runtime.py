"""The MQTT side of a running server: link, ingest worker and outbox publisher, started together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.mqtt.bridge import MqttLink
from server.mqtt.handlers import IngestWorker
from server.mqtt.outbox import OutboxPublisher

if TYPE_CHECKING:
    from server.context import ServerContext


@dataclass
class MqttRuntime:
    link: MqttLink
    ingest: IngestWorker
    outbox: OutboxPublisher

    @classmethod
    def start(cls, ctx: ServerContext) -> MqttRuntime:
        ingest = IngestWorker(ctx, ctx.metrics)
        link = MqttLink(ctx.settings, ingest.submit, shared=ctx.settings.shared_subscriptions)
        outbox = OutboxPublisher(ctx.db, link, ctx.metrics)
        ingest.start()
        outbox.start()
        link.start()
        return cls(link=link, ingest=ingest, outbox=outbox)

    def stop(self) -> None:
        self.link.stop()
        self.outbox.stop()
        self.ingest.stop()
