"""Queries of rollouts, deployments and desired states (and the catalog lookups they need)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from server.catalog.tables import CatalogModel, ModelArtifact, ModelVersion, VersionStatus
from server.rollouts.tables import Deployment, DesiredRecord


class DesiredRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, device_id: str) -> DesiredRecord | None:
        return self.session.get(DesiredRecord, device_id)

    def upsert(self, record: DesiredRecord) -> DesiredRecord:
        return self.session.merge(record)

    def expiring(self, device_ids: Sequence[str], before: datetime) -> Sequence[DesiredRecord]:
        if not device_ids:
            return []
        q = sa.select(DesiredRecord).where(
            DesiredRecord.device_id.in_(device_ids), DesiredRecord.expires_at <= before
        )
        return self.session.scalars(q).all()


class CatalogLookup:
    """Read-only views of the model registry needed to target devices."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def active_version(self, model: str, version: str) -> ModelVersion | None:
        q = (
            sa.select(ModelVersion)
            .join(CatalogModel, ModelVersion.model_id == CatalogModel.id)
            .where(
                CatalogModel.name == model,
                ModelVersion.version == version,
                ModelVersion.status == VersionStatus.active,
            )
        )
        return self.session.scalars(q).first()

    def artifacts(self, version_id: int) -> Sequence[ModelArtifact]:
        q = (
            sa.select(ModelArtifact)
            .where(ModelArtifact.version_id == version_id)
            .order_by(ModelArtifact.variant)
        )
        return self.session.scalars(q).all()


class DeploymentRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, deployment: Deployment) -> Deployment:
        self.session.add(deployment)
        return deployment

    def for_desired(self, pairs: Sequence[tuple[str, int]]) -> dict[tuple[str, int], Deployment]:
        """Deployments keyed by (device_id, desired_seq)."""
        if not pairs:
            return {}
        q = sa.select(Deployment).where(
            sa.tuple_(Deployment.device_id, Deployment.desired_seq).in_(list(pairs))
        )
        return {(d.device_id, d.desired_seq or 0): d for d in self.session.scalars(q)}

    def latest_for_device(self, device_id: str) -> Deployment | None:
        q = (
            sa.select(Deployment)
            .where(Deployment.device_id == device_id)
            .order_by(Deployment.id.desc())
            .limit(1)
        )
        return self.session.scalars(q).first()
