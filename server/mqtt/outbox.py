"""The transactional outbox and its publisher.

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

import json
import logging
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.orm import Session

from device_client.protocol.topics import InvalidTopic, TopicKind, parse_topic
from server.bulk import execute_many
from server.db import OUTBOX_DIRTY, Database, utcnow
from server.metrics import Metrics
from server.mqtt.tables import OutboxMessage

log = logging.getLogger(__name__)


def enqueue(
    session: Session, topic: str, payload: dict[str, Any] | bytes, *, qos: int = 1, retain: bool = False
) -> None:
    """Queue an MQTT message in the caller's transaction."""
    data = payload if isinstance(payload, bytes) else _json_bytes(payload)
    session.add(OutboxMessage(topic=topic, payload=data, qos=qos, retain=retain))
    session.info[OUTBOX_DIRTY] = True


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def enqueue_many(
    session: Session,
    messages: Sequence[tuple[str, dict[str, Any] | bytes]],
    *,
    qos: int = 1,
    retain: bool = True,
) -> None:
    """Queue many messages (topic, JSON payload or its bytes) with one multi-row INSERT in the
    caller's transaction (the rollout engine notifies thousands of devices at once)."""
    if not messages:
        return
    now = utcnow()
    rows = [
        {"topic": topic, "qos": qos, "retain": retain, "created_at": now, "attempts": 0,
         "payload": payload if isinstance(payload, bytes) else _json_bytes(payload)}
        for topic, payload in messages
    ]  # fmt: skip
    execute_many(session, sa.insert(OutboxMessage.__table__), rows)
    session.info[OUTBOX_DIRTY] = True


class OutboxRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def claim_pending(self, limit: int) -> Sequence[sa.Row[int, str, bytes, int, bool]]:
        """(id, topic, payload, qos, retain) of up to ``limit`` pending rows in id order; on
        PostgreSQL locked (``SKIP LOCKED``: another replica's publisher takes the next ones).
        Plain rows, not ORM objects: a fan-out claims thousands per second."""
        m = OutboxMessage
        q = (
            sa.select(m.id, m.topic, m.payload, m.qos, m.retain)
            .where(m.published_at.is_(None))
            .order_by(m.id)
            .limit(limit)
        )
        if self.session.get_bind().dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        return self.session.connection().execute(q).all()

    def mark(self, published: Sequence[int], attempted: Sequence[int], at: datetime) -> None:
        """One UPDATE per set: ``published`` rows get ``published_at``; every row in ``attempted``
        (which includes them) counts one more attempt."""
        m = OutboxMessage
        if published:
            self.session.execute(sa.update(m).where(m.id.in_(published)).values(published_at=at))
        if attempted:
            self.session.execute(sa.update(m).where(m.id.in_(attempted)).values(attempts=m.attempts + 1))

    @property
    def concurrent_publishers(self) -> bool:
        """Whether publishers can run side by side (PostgreSQL: replicas; one process on SQLite)."""
        return self.session.get_bind().dialect.name == "postgresql"

    def superseded_desired(self, published: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Of the retained (topic, payload) messages just published, the DesiredStates a newer one
        has replaced in the database since: (topic, current envelope) to publish again."""
        from server.rollouts.tables import DesiredRecord  # (server.rollouts imports this module)

        seqs: dict[str, tuple[str, int]] = {}
        for topic, payload in published:
            try:
                device_id, kind = parse_topic(topic)
                if kind != TopicKind.desired:
                    continue
                seq = int(orjson.loads(payload)["signed"]["seq"])
            except (InvalidTopic, ValueError, KeyError, TypeError):
                continue
            if seq > seqs.get(device_id, (topic, -1))[1]:
                seqs[device_id] = (topic, seq)
        if not seqs:
            return []
        r = DesiredRecord
        newer = [
            device_id
            for device_id, seq in self.session.connection().execute(
                sa.select(r.device_id, r.seq).where(r.device_id.in_(list(seqs)))
            )
            if seq > seqs[device_id][1]
        ]
        if not newer:
            return []
        rows = self.session.connection().execute(
            sa.select(r.device_id, r.envelope).where(r.device_id.in_(newer)).order_by(r.device_id)
        )
        return [(seqs[device_id][0], _json_bytes(envelope)) for device_id, envelope in rows]

    def pending_count(self) -> int:
        q = sa.select(sa.func.count()).select_from(OutboxMessage).where(OutboxMessage.published_at.is_(None))
        return int(self.session.scalar(q) or 0)

    def prune_published(self, older_than: timedelta) -> int:
        q = sa.delete(OutboxMessage).where(OutboxMessage.published_at < utcnow() - older_than)
        return self.session.execute(q).rowcount or 0  # type: ignore[attr-defined]  # DML: a CursorResult


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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flushes = 0

    def kick(self) -> None:
        self._kick.set()

    def start(self) -> None:
        self.db.outbox_listener = self.kick
        self._thread = threading.Thread(target=self._run, name="mqtt-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.db.outbox_listener == self.kick:
            self.db.outbox_listener = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.sweep_s)
            self._kick.clear()
            if self._stop.is_set() or not self.link.connected:
                continue
            try:
                while self.flush() == self.batch and not self._stop.is_set():
                    pass
            except Exception:
                log.exception("outbox flush failed; retrying")
                self._stop.wait(1.0)

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
