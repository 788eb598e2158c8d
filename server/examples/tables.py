"""The ``hard_examples`` table: one escalated request the cloud tier kept, its input tensors and
the cloud's outputs (each an ``.npz`` blob), who sent it and when. Shared by every cloud replica."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from server.db import Base, UTCDateTime, utcnow


class HardExample(Base):
    __tablename__ = "hard_examples"
    __table_args__ = (sa.Index("ix_hard_examples_model_id", "model", "id"),)

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(64))
    version: Mapped[str] = mapped_column(sa.String(64))
    device_id: Mapped[str] = mapped_column(sa.String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: len(inputs) + len(outputs): what counts against the storage cap
    size_bytes: Mapped[int] = mapped_column(sa.Integer)
    inputs: Mapped[bytes] = mapped_column(sa.LargeBinary)
    outputs: Mapped[bytes] = mapped_column(sa.LargeBinary)
