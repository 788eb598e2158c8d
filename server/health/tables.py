"""Inference health windows reported by devices."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from server.db import Base, UTCDateTime


class HealthSample(Base):
    """One device's health window (``fleet.health/1``), deduplicated by (device_id, seq)."""

    __tablename__ = "health_windows"
    __table_args__ = (
        sa.UniqueConstraint("device_id", "seq"),
        sa.Index("ix_health_windows_model_version_at", "model", "version", "at"),
        sa.Index("ix_health_windows_device_at", "device_id", "at"),
    )

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(sa.String(63))
    seq: Mapped[int] = mapped_column(sa.BigInteger)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    window_s: Mapped[float] = mapped_column(sa.Float)
    model: Mapped[str] = mapped_column(sa.String(64))
    version: Mapped[str] = mapped_column(sa.String(64))
    mode: Mapped[str] = mapped_column(sa.String(16))
    requests: Mapped[int] = mapped_column(sa.Integer)
    errors: Mapped[int] = mapped_column(sa.Integer)
    p50_ms: Mapped[float | None] = mapped_column(sa.Float)
    p95_ms: Mapped[float | None] = mapped_column(sa.Float)
    p99_ms: Mapped[float | None] = mapped_column(sa.Float)
    shadow_requests: Mapped[int | None] = mapped_column(sa.Integer)
    agreement: Mapped[float | None] = mapped_column(sa.Float)
    shadow_p95_ms: Mapped[float | None] = mapped_column(sa.Float)
