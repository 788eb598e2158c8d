"""The transactional outbox: MQTT messages written with the state change that causes them."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from server.db import Base, UTCDateTime, utcnow


class OutboxMessage(Base):
    __tablename__ = "mqtt_outbox"
    __table_args__ = (sa.Index("ix_mqtt_outbox_pending", "published_at", "id"),)

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    topic: Mapped[str] = mapped_column(sa.String(255))
    payload: Mapped[bytes] = mapped_column(sa.LargeBinary)
    qos: Mapped[int] = mapped_column(sa.SmallInteger, default=1)
    retain: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
