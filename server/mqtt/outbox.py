"""The publisher of the transactional outbox (:mod:`server.rollouts.outbox`).

A state change that must reach a device (a new signed DesiredState) writes an ``mqtt_outbox`` row
in the same transaction. After the commit, the publisher is kicked; it publishes pending rows in
id order, waits for the broker's PUBACK and only then marks them published. A crash between commit
and publish therefore loses nothing: the rows are still pending when the server comes back (the
publisher also sweeps on a timer). Several replicas may run publishers: on PostgreSQL each batch
is claimed with ``FOR UPDATE SKIP LOCKED``; a message published twice is harmless (devices ignore a
DesiredState whose seq they have already accepted).

Publishers side by side can publish one device's DesiredStates out of order: replica B publishes
seq 6 while replica A, which claimed seq 5 a moment before, is still sending it; the broker then
retains 5, and a device that connects later gets an outdated state. So after its PUBACKs each
publisher checks the DesiredStates it has just published against the database: one that a newer
state has replaced is followed by the current state, queued again (:meth:`OutboxPublisher.flush`).
That newer state was committed before anyone could publish it, so whichever publish reached the
broker last, the current state is published after it.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any, Protocol

from device_client.loop import BackgroundLoop
from server.db import Database, utcnow
from server.metrics import Metrics
from server.rollouts.outbox import OutboxRepository, enqueue_many

log = logging.getLogger(__name__)


class Publisher(Protocol):
    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> Any: ...


class OutboxPublisher:
    """Publishes outbox rows through ``link`` on a background thread."""

    def __init__(
        self,
        db: Database,
        link: Publisher,
        metrics: Metrics,
        *,
        batch: int = 1000,
        sweep_s: float = 1.0,
        ack_timeout_s: float = 10.0,
    ) -> None:
        self.db = db
        self.link = link
        self.metrics = metrics
        self.batch = batch
        self.sweep_s = sweep_s
        self.ack_timeout_s = ack_timeout_s
        self._kick = threading.Event()
        self._flushes = 0
        self._stop = threading.Event()
        self._loop = BackgroundLoop(
            "mqtt-outbox",
            self._step,
            self._stop,
            failure="outbox flush failed; retrying",
            error_pause_s=1.0,
            logger=log,
        )

    def kick(self) -> None:
        self._kick.set()

    def start(self) -> None:
        self.db.outbox_listener = self.kick
        self._loop.start()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        self._loop.join(10)
        if self.db.outbox_listener == self.kick:
            self.db.outbox_listener = None

    def _step(self) -> None:
        """Wait for a kick (or the sweep), then publish until nothing is pending."""
        self._kick.wait(self.sweep_s)
        self._kick.clear()
        if self._stop.is_set() or not self.link.connected:
            return
        while self.flush() == self.batch and not self._stop.is_set():
            pass

    def flush(self) -> int:
        """Publish one batch of pending rows; return how many were confirmed by the broker."""
        with self.db.session_scope() as session:
            repo = OutboxRepository(session)
            rows = repo.claim_pending(self.batch)
            infos = []
            for row_id, topic, payload, qos, retain in rows:
                try:
                    infos.append((row_id, self.link.publish(topic, bytes(payload), qos, retain)))
                except Exception as exc:  # not connected, queue full: retry the rest later
                    log.warning("outbox publish of %s failed: %s", topic, exc)
                    break
            published: list[int] = []
            for row_id, info in infos:
                try:
                    info.wait_for_publish(self.ack_timeout_s)
                except (RuntimeError, ValueError):
                    break
                if not info.is_published():
                    break
                published.append(row_id)
            repo.mark(published, [row_id for row_id, _ in infos], utcnow())
            if published and repo.concurrent_publishers:
                sent = {row_id: (topic, payload) for row_id, topic, payload, _, retain in rows if retain}
                current = repo.superseded_desired([sent[i] for i in published if i in sent])
                if current:  # another replica's publisher may have sent these newer states first
                    enqueue_many(session, current)
                    self.metrics.inc(
                        "fleet_mqtt_desired_superseded_total", len(current),
                        help="DesiredStates re-queued because a newer one was committed (publish order)",
                    )
            done = len(published)
            self._flushes += 1
            if self._flushes % 100 == 0:
                repo.prune_published(timedelta(hours=1))
        if done:
            self.metrics.inc(
                "fleet_mqtt_published_total", done, help="MQTT messages published from the outbox"
            )
        return done
