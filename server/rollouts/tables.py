"""Rollouts, per-device deployments, each device's current signed DesiredState, and the outbox of
MQTT messages (:mod:`server.rollouts.outbox`) written with the state changes that cause them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from device_client.protocol.messages import DeploymentPhase
from server.db import Base, JSONType, UTCDateTime, utcnow


class RolloutStatus(StrEnum):
    draft = "draft"
    running = "running"
    paused = "paused"
    completed = "completed"
    aborted = "aborted"
    rolling_back = "rolling_back"
    rolled_back = "rolled_back"


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(64), index=True)
    version: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[RolloutStatus] = mapped_column(
        sa.Enum(RolloutStatus, native_enum=False, length=16), default=RolloutStatus.draft, index=True
    )
    #: {tags: {k: v}, device_ids: [...], hardware: {arch, min_ram_mb, providers}}
    selector: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    #: [{percent | count, soak_s, shadow}]
    stages: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    gates: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    probation: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    on_failure: Mapped[str] = mapped_column(sa.String(16), default="pause")
    max_concurrent_downloads: Mapped[int] = mapped_column(sa.Integer, default=50)
    device_timeout_s: Mapped[int] = mapped_column(sa.Integer, default=900)
    current_stage: Mapped[int] = mapped_column(sa.Integer, default=0)
    stage_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: when the rollback began: its devices get device_timeout_s from then to confirm their way
    #: back (the stage keeps its own start, so its health still covers the stage that failed)
    rollback_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: when the current stage's soak ends (None until its devices have settled)
    soak_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: why the rollout paused, failed or rolled back; the numbers behind the verdict
    reason: Mapped[str | None] = mapped_column(sa.Text)
    verdict: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    created_by: Mapped[str | None] = mapped_column(sa.String(80))
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: optimistic concurrency: every UPDATE of the row checks and bumps it, so an engine tick and
    #: an operator action that read the same version cannot both write (the later one fails with
    #: StaleDataError and changes nothing). On SQLite, which has no row locks, this is what keeps a
    #: tick from notifying devices after a concurrent rollback or abort; on PostgreSQL it also
    #: covers an API action that read the row while a tick held it
    row_version: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="1")
    #: the routing policy (``fleet.routing/1``) every DesiredState of the rollout carries; None:
    #: they carry none (the devices answer at the edge alone)
    routing: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    #: the policies the devices held before the rollout, by key (a deployment's
    #: ``details["previous_routing"]``): what a rollback restores
    previous_routing: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict, server_default="{}")

    __mapper_args__ = {"version_id_col": row_version}


class Deployment(Base):
    """One device's part in a rollout (or a direct assignment when ``rollout_id`` is NULL)."""

    __tablename__ = "deployments"
    __table_args__ = (
        sa.UniqueConstraint("rollout_id", "device_id"),
        sa.Index("ix_deployments_rollout_phase", "rollout_id", "phase"),
    )

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    rollout_id: Mapped[str | None] = mapped_column(sa.ForeignKey("rollouts.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(sa.ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    stage: Mapped[int] = mapped_column(sa.Integer, default=0)
    model: Mapped[str] = mapped_column(sa.String(64))
    version: Mapped[str] = mapped_column(sa.String(64))
    #: the version the device ran before (what a rollback returns it to)
    previous_version: Mapped[str | None] = mapped_column(sa.String(64))
    phase: Mapped[DeploymentPhase] = mapped_column(
        sa.Enum(DeploymentPhase, native_enum=False, length=16), default=DeploymentPhase.pending
    )
    desired_seq: Mapped[int | None] = mapped_column(sa.Integer)
    reason: Mapped[str | None] = mapped_column(sa.Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    #: p95 latency of the previous model on this device before the rollout touched it
    baseline_p95_ms: Mapped[float | None] = mapped_column(sa.Float)
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class DesiredRecord(Base):
    """The signed DesiredState each device should hold (also retained on the broker)."""

    __tablename__ = "desired_states"

    device_id: Mapped[str] = mapped_column(sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(sa.Integer)
    rollout_id: Mapped[str | None] = mapped_column(sa.String(16))
    model: Mapped[str] = mapped_column(sa.String(64))
    version: Mapped[str] = mapped_column(sa.String(64))
    release: Mapped[int] = mapped_column(sa.Integer)
    variant: Mapped[str] = mapped_column(sa.String(32))
    mode: Mapped[str] = mapped_column(sa.String(16))
    probation: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    envelope: Mapped[dict[str, Any]] = mapped_column(JSONType)


class OutboxMessage(Base):
    """An MQTT message written in the transaction of the state change that causes it; the
    publisher (:mod:`server.mqtt.outbox`) sends it after the commit."""

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
