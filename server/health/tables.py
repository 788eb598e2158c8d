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
    # hybrid edge/cloud routing (set when the model runs under a routing policy): who answered,
    # escalations and why the cloud was not asked, the cloud round trip, edge/cloud agreement
    answered_edge: Mapped[int | None] = mapped_column(sa.Integer)
    answered_cloud: Mapped[int | None] = mapped_column(sa.Integer)
    answered_cache: Mapped[int | None] = mapped_column(sa.Integer)
    escalations: Mapped[int | None] = mapped_column(sa.Integer)
    budget_limited: Mapped[int | None] = mapped_column(sa.Integer)
    breaker_open: Mapped[int | None] = mapped_column(sa.Integer)
    cloud_failed: Mapped[int | None] = mapped_column(sa.Integer)
    escalation_rate: Mapped[float | None] = mapped_column(sa.Float)
    cloud_p95_ms: Mapped[float | None] = mapped_column(sa.Float)
    cloud_compared: Mapped[int | None] = mapped_column(sa.Integer)
    cloud_agreement: Mapped[float | None] = mapped_column(sa.Float)
    #: the variant that served the window, its mean CPU time per request and the process's
    #: resident memory at its end (None: an older device's window)
    variant: Mapped[str | None] = mapped_column(sa.String(32))
    cpu_ms_per_request: Mapped[float | None] = mapped_column(sa.Float)
    rss_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)


#: the variant and resource fields of a health window, stored as they come (``fleet.health/1``)
RESOURCE_FIELDS = ("variant", "cpu_ms_per_request", "rss_bytes")

#: the hybrid routing fields of a health window, stored as they come (``fleet.health/1``)
ROUTING_FIELDS = (
    "answered_edge", "answered_cloud", "answered_cache", "escalations", "budget_limited", "breaker_open",
    "cloud_failed", "escalation_rate", "cloud_p95_ms", "cloud_compared", "cloud_agreement",
)  # fmt: skip


class HealthRollup(Base):
    """Health windows folded per device, model, version, mode and time bucket, with sums so that
    aggregates over rollups equal aggregates over the raw windows (:mod:`server.health.rollup`)."""

    __tablename__ = "health_rollups"
    __table_args__ = (sa.Index("ix_health_rollups_model_version_bucket", "model", "version", "bucket"),)

    device_id: Mapped[str] = mapped_column(sa.String(63), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    version: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    mode: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    #: start of the bucket; the bucket holds windows with ``bucket <= at < bucket + bucket_s``
    bucket: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    bucket_s: Mapped[int] = mapped_column(sa.Integer)
    windows: Mapped[int] = mapped_column(sa.Integer)
    requests: Mapped[int] = mapped_column(sa.BigInteger)
    errors: Mapped[int] = mapped_column(sa.BigInteger)
    #: requests of the windows that reported a p95, and the sum of p95_ms * requests over them
    p95_requests: Mapped[int] = mapped_column(sa.BigInteger)
    p95_weighted_ms: Mapped[float] = mapped_column(sa.Float)
    #: shadow requests of the windows that reported an agreement, and sum of agreement * them
    shadow_requests: Mapped[int] = mapped_column(sa.BigInteger)
    agreement_weighted: Mapped[float] = mapped_column(sa.Float)
    #: hybrid routing: requests of the windows that reported escalations (the escalation rate's
    #: denominator), and the counts summed over the windows that reported them
    routed_requests: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    answered_edge: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    answered_cloud: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    answered_cache: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    escalations: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    budget_limited: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    breaker_open: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    cloud_failed: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    #: edge answers compared with the cloud's in the windows that reported a cloud agreement, and
    #: the sum of cloud_agreement * them
    cloud_compared: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    cloud_agreement_weighted: Mapped[float] = mapped_column(sa.Float, server_default="0")
    #: cloud answers compared in the windows that reported a cloud p95, and the sum of
    #: cloud_p95_ms * them
    cloud_p95_calls: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    cloud_p95_weighted_ms: Mapped[float] = mapped_column(sa.Float, server_default="0")
    #: the variant of the last window folded in (one device serves one variant of a version)
    variant: Mapped[str | None] = mapped_column(sa.String(32))
    #: requests of the windows that reported a CPU time per request, and the sum of
    #: cpu_ms_per_request * them
    cpu_requests: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    cpu_weighted_ms: Mapped[float] = mapped_column(sa.Float, server_default="0")
