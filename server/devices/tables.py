"""Devices, their tags, enrollment tokens and revoked certificates."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from server.db import Base, JSONType, UTCDateTime, utcnow


class DeviceStatus(StrEnum):
    enrolled = "enrolled"  # has a certificate, never seen on the broker
    online = "online"
    offline = "offline"
    decommissioned = "decommissioned"


class Device(Base):
    __tablename__ = "devices"
    #: the device list filters (status, arch) page in id order: (filter, id) keeps them index-bound
    __table_args__ = (
        sa.Index("ix_devices_status_id", "status", "id"),
        sa.Index("ix_devices_arch_id", "arch", "id"),
    )

    id: Mapped[str] = mapped_column(sa.String(63), primary_key=True)
    status: Mapped[DeviceStatus] = mapped_column(
        sa.Enum(DeviceStatus, native_enum=False, length=16), default=DeviceStatus.enrolled
    )
    hardware: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    arch: Mapped[str] = mapped_column(sa.String(32))
    cert_serial: Mapped[str] = mapped_column(sa.String(40))
    cert_not_after: Mapped[datetime] = mapped_column(UTCDateTime)
    #: SHA-256 of the device's artifact-download token
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    enrolled_with: Mapped[str | None] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decommissioned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: what the device reports it serves (from presence and reports)
    serving: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)
    #: highest report seq processed (reports are deduplicated by device-monotonic seq)
    last_report_seq: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    #: seq of the last DesiredState signed for this device; strictly increasing
    desired_seq: Mapped[int] = mapped_column(sa.Integer, default=0)

    tags: Mapped[list[DeviceTag]] = relationship(
        back_populates="device", cascade="all, delete-orphan", lazy="selectin", order_by="DeviceTag.key"
    )

    def tag_dict(self) -> dict[str, str]:
        return {t.key: t.value for t in self.tags}


class DeviceTag(Base):
    __tablename__ = "device_tags"
    __table_args__ = (sa.Index("ix_device_tags_key_value", "key", "value", "device_id"),)

    device_id: Mapped[str] = mapped_column(sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(63), primary_key=True)
    value: Mapped[str] = mapped_column(sa.String(128))

    device: Mapped[Device] = relationship(back_populates="tags")


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(sa.String(64))
    #: tags every device enrolled with this token receives
    tags: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)
    uses_left: Mapped[int] = mapped_column(sa.Integer, default=1)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(sa.String(80))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RevokedCertificate(Base):
    """Serials on the fleet CA's certificate revocation list."""

    __tablename__ = "revoked_certificates"

    serial: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    device_id: Mapped[str] = mapped_column(sa.String(63), index=True)
    revoked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeviceEvent(Base):
    """The log of a device's reports (phase changes), deduplicated by (device_id, seq)."""

    __tablename__ = "device_events"
    __table_args__ = (sa.UniqueConstraint("device_id", "seq"),)

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(sa.ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(sa.BigInteger)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    phase: Mapped[str] = mapped_column(sa.String(16))
    rollout_id: Mapped[str | None] = mapped_column(sa.String(16))
    desired_seq: Mapped[int | None] = mapped_column(sa.Integer)
    model: Mapped[str | None] = mapped_column(sa.String(64))
    version: Mapped[str | None] = mapped_column(sa.String(64))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
