"""The MQTT side of a running server: the consuming link and the ingest worker (on a thread here,
or in worker processes: :mod:`server.mqtt.workers`), the publish-only link and the outbox
publisher, started together (two connections: see :mod:`server.mqtt.bridge`), each with an
identity of its own (:mod:`server.mqtt.identity`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.mqtt.bridge import MqttLink
from server.mqtt.broker import check_acl_lists
from server.mqtt.handlers import IngestWorker
from server.mqtt.identity import ClientIdentity, consumer_id, publisher_id, server_connection_ids, server_name
from server.mqtt.outbox import OutboxPublisher
from server.mqtt.workers import IngestProcesses

if TYPE_CHECKING:
    from server.context import ServerContext


@dataclass
class MqttRuntime:
    #: the consuming link and its ingest worker, or None with ``ingest_processes`` > 0
    link: MqttLink | None
    ingest: IngestWorker | None
    #: the ingest worker processes, or None when ingest runs on a thread of this process
    workers: IngestProcesses | None
    publisher: MqttLink
    outbox: OutboxPublisher

    @classmethod
    def start(cls, ctx: ServerContext) -> MqttRuntime:
        # a connection the broker's ACL does not know would be let in but get nothing: in a shared
        # subscription, the share of the fleet's messages the broker hands it would be lost
        check_acl_lists(ctx.settings.broker_dir, server_connection_ids(ctx.settings))
        name = server_name(ctx.settings)
        publisher = MqttLink(
            ctx.settings,
            None,
            identity=ClientIdentity.issue(ctx.ca, publisher_id(name)),
            metrics=ctx.metrics,
            name="publish",
        )
        outbox = OutboxPublisher(ctx.db, publisher, ctx.metrics)
        link = ingest = workers = None
        if ctx.settings.ingest_processes:
            workers = IngestProcesses(ctx, ctx.settings.ingest_processes)
        else:
            ingest = IngestWorker(ctx, ctx.metrics)
            link = MqttLink(
                ctx.settings,
                ingest.submit,
                identity=ClientIdentity.issue(ctx.ca, consumer_id(name)),
                shared=ctx.settings.shared_subscriptions,
                metrics=ctx.metrics,
            )
            ingest.start()
        outbox.start()
        publisher.start()
        if link is not None:
            link.start()
        if workers is not None:
            workers.start()
        return cls(link=link, ingest=ingest, workers=workers, publisher=publisher, outbox=outbox)

    @property
    def connected(self) -> bool:
        if self.link is not None:
            return self.link.connected and self.publisher.connected
        return self.workers is not None and self.workers.connected and self.publisher.connected

    def status(self) -> dict[str, dict[str, Any]]:
        """Each link's state and last error, by role (``consume`` or ``ingest-N``, ``publish``)."""
        links = {"publish": self.publisher.status()}
        if self.link is not None:
            links["consume"] = self.link.status()
        if self.workers is not None:
            links.update(self.workers.status())
        return links

    def wait_connected(self, timeout: float) -> bool:
        """Both connections up and the consuming one(s) subscribed."""
        if self.workers is not None and not self.workers.wait_connected(timeout):
            return False
        if self.link is not None and not self.link.wait_connected(timeout):
            return False
        return self.publisher.wait_connected(timeout)

    def stop(self) -> None:
        if self.link is not None:
            self.link.stop()
        if self.workers is not None:
            self.workers.stop()
        self.outbox.stop()
        self.publisher.stop()
        if self.ingest is not None:
            self.ingest.stop()
