"""Queries of the model registry."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.catalog.tables import CatalogModel, ModelArtifact, ModelVersion, VersionStatus
from server.db import utcnow


class CatalogRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    # -- models ------------------------------------------------------------------------------
    def get_model(self, name: str) -> CatalogModel | None:
        return self.session.scalars(sa.select(CatalogModel).where(CatalogModel.name == name)).first()

    def get_model_locked(self, name: str) -> CatalogModel | None:
        """The model row, locked ``FOR UPDATE`` (PostgreSQL) until the transaction ends."""
        q = (
            sa.select(CatalogModel)
            .where(CatalogModel.name == name)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return self.session.scalars(q).first()

    def get_or_create_model_locked(self, name: str) -> CatalogModel:
        """The model row named ``name``, created if absent, and locked ``FOR UPDATE`` (PostgreSQL;
        SQLite serialises writers anyway) so that release numbers are handed out one at a time.

        ``INSERT .. ON CONFLICT DO NOTHING`` makes two concurrent first pushes of a model safe.
        """
        dialect = self.session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = (
            insert(CatalogModel)
            .values(name=name, last_release=0, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=[CatalogModel.name])
        )
        self.session.execute(stmt)
        model = self.get_model_locked(name)
        assert model is not None  # inserted above or by a concurrent transaction
        return model

    def list_models(self) -> Sequence[CatalogModel]:
        return self.session.scalars(sa.select(CatalogModel).order_by(CatalogModel.name)).all()

    def version_counts(self) -> dict[int, int]:
        q = sa.select(ModelVersion.model_id, sa.func.count().label("n")).group_by(ModelVersion.model_id)
        return {row.model_id: row.n for row in self.session.execute(q)}

    def latest_active(self) -> dict[int, ModelVersion]:
        """The active version with the highest release of each model, by model id."""
        best = (
            sa.select(ModelVersion.model_id, sa.func.max(ModelVersion.release).label("release"))
            .where(ModelVersion.status == VersionStatus.active)
            .group_by(ModelVersion.model_id)
            .subquery()
        )
        q = sa.select(ModelVersion).join(
            best, sa.and_(ModelVersion.model_id == best.c.model_id, ModelVersion.release == best.c.release)
        )
        return {v.model_id: v for v in self.session.scalars(q)}

    # -- versions ----------------------------------------------------------------------------
    def get_version(self, model_id: int, version: str) -> ModelVersion | None:
        q = sa.select(ModelVersion).where(ModelVersion.model_id == model_id, ModelVersion.version == version)
        return self.session.scalars(q).first()

    def list_versions(self, model_id: int) -> Sequence[ModelVersion]:
        q = (
            sa.select(ModelVersion)
            .where(ModelVersion.model_id == model_id)
            .order_by(ModelVersion.release.desc())
        )
        return self.session.scalars(q).all()

    def add_version(self, version: ModelVersion) -> ModelVersion:
        self.session.add(version)
        self.session.flush()
        return version

    def add_artifact(self, artifact: ModelArtifact) -> ModelArtifact:
        self.session.add(artifact)
        self.session.flush()
        return artifact

    def artifact_by_target(self, target_path: str) -> ModelArtifact | None:
        q = sa.select(ModelArtifact).where(ModelArtifact.target_path == target_path)
        return self.session.scalars(q).first()

    # -- what devices are sent -----------------------------------------------------------------
    def active_version(self, model: str, version: str) -> ModelVersion | None:
        """The version ``version`` of the model named ``model``, if it is active."""
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

    def published_artifacts(self, version_id: int) -> Sequence[ModelArtifact]:
        """The version's artifacts listed in the signed targets metadata (not those staged for an
        offline targets signature: no device would find them)."""
        q = (
            sa.select(ModelArtifact)
            .where(ModelArtifact.version_id == version_id, ModelArtifact.published.is_(True))
            .order_by(ModelArtifact.variant)
        )
        return self.session.scalars(q).all()
