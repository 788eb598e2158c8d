"""The ML model registry: models, their versions, and each version's signed bundles (variants).

ORM classes are named ``CatalogModel`` etc. so that the word "model" always means an ML model.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from server.db import Base, JSONType, UTCDateTime, utcnow


class VersionStatus(StrEnum):
    #: listed in the signed targets metadata: can be rolled out
    active = "active"
    #: pushed while the targets key is offline: staged, waiting for ``fleet model sign``
    pending = "pending"
    revoked = "revoked"


class CatalogModel(Base):
    __tablename__ = "catalog_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    #: the highest release number handed out; only grows (anti-rollback floor on devices)
    last_release: Mapped[int] = mapped_column(sa.Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(back_populates="model", lazy="raise")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (sa.UniqueConstraint("model_id", "version"), sa.UniqueConstraint("model_id", "release"))

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(sa.ForeignKey("catalog_models.id", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(sa.String(64))
    release: Mapped[int] = mapped_column(sa.Integer)
    status: Mapped[VersionStatus] = mapped_column(
        sa.Enum(VersionStatus, native_enum=False, length=16), default=VersionStatus.active
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(sa.String(80))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    model: Mapped[CatalogModel] = relationship(back_populates="versions", lazy="joined")
    artifacts: Mapped[list[ModelArtifact]] = relationship(
        back_populates="version", lazy="selectin", order_by="ModelArtifact.variant"
    )


class ModelArtifact(Base):
    """One signed bundle of a version: a TUF target for one hardware variant."""

    __tablename__ = "model_artifacts"
    __table_args__ = (sa.UniqueConstraint("version_id", "variant"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(
        sa.ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    variant: Mapped[str] = mapped_column(sa.String(32))
    #: TUF target path, e.g. ``resnet/1.2.0/default/bundle.tar``
    target_path: Mapped[str] = mapped_column(sa.String(255), unique=True)
    length: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    #: input/output signature and validation spec, as in bundle.json
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    outputs: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    #: hardware constraints: arch, min_ram_mb, providers, cpu_flags
    constraints: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    #: measured on push for a built variant (``--quantize int8``) and its fp32 source: size_bytes,
    #: size_ratio, agreement, agreement_metric, latency_ratio (server/catalog/quantize.py)
    measurements: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: listed in the signed targets metadata; false while staged for an offline targets signature
    published: Mapped[bool] = mapped_column(sa.Boolean, default=True, server_default=sa.true())

    version: Mapped[ModelVersion] = relationship(back_populates="artifacts", lazy="joined")
