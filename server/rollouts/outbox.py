"""The transactional outbox: MQTT messages queued in the transaction of the state change that
causes them (a new signed DesiredState), and the queries the publisher (:mod:`server.mqtt.outbox`)
claims, marks and prunes them with. A crash between the commit and the publish loses nothing: the
rows stay pending until a publisher confirms them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.orm import Session

from device_client.protocol.topics import InvalidTopic, TopicKind, parse_topic
from server.bulk import execute_many
from server.db import OUTBOX_DIRTY, utcnow
from server.rollouts.tables import DesiredRecord, OutboxMessage


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
