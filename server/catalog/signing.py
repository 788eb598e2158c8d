"""Signing the targets metadata with an offline targets key (``fleet model sign``).

While the targets key is away, pushes and revocations are staged; the signer fetches the staged
targets metadata, checks the bundles, signs it and sends it back, and the server publishes it only
if it is exactly what is staged. :func:`reconcile_published` then brings the catalog in line, as it
does at start-up and in every run of the refresh job (docs/architecture.md, "Offline targets key").
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.orm import Session
from tuf.api.metadata import Metadata, TargetFile, Targets

from server.admin.schemas import Principal
from server.admin.service import audit
from server.catalog.tables import ModelArtifact, ModelVersion, VersionStatus
from server.errors import Conflict, Invalid, NotFound
from server.trust.repository import ImageRepository, SignatureRejected, StagingError, consistent_target_name

if TYPE_CHECKING:
    from server.context import ServerContext

log = logging.getLogger(__name__)


class StagedTarget(BaseModel):
    path: str
    #: where to download it for checking: ``/tuf/targets/<this>``
    file: str
    length: int
    sha256: str
    custom: dict[str, Any]


class StagedTargetsOut(BaseModel):
    """Targets metadata waiting for the offline targets key, and what it changes."""

    #: the metadata to sign (``signed`` and an empty ``signatures``); set ``expires``, sign, send back
    metadata: dict[str, Any]
    version: int
    current_version: int
    current_expires: datetime
    #: the server's targets lifetime: ``fleet model sign`` dates ``expires`` this far from now
    lifetime_s: int
    listed: list[StagedTarget]
    unlisted: list[StagedTarget]


class SignedTargetsOut(BaseModel):
    version: int
    expires: datetime
    #: catalog entries now listed (``model@version (variant)``)
    published: list[str]
    #: targets no longer listed
    unlisted: list[str]


def _staged_target(info: TargetFile) -> StagedTarget:
    sha256 = info.hashes["sha256"]
    return StagedTarget(
        path=info.path,
        file=consistent_target_name(info.path, sha256),
        length=info.length,
        sha256=sha256,
        custom=dict(info.custom or {}),
    )


def reconcile_published(session: Session, repo: ImageRepository, *, purge_revoked: bool = True) -> list[str]:
    """Bring the catalog in line with the signed targets metadata; returns what became published.

    Staged artifacts whose target is now listed with the same hash become ``published`` (their
    ``pending`` version ``active``); unless not ``purge_revoked`` (inside a transaction that may
    still roll back and re-list them), the stored files of revoked versions' targets that are
    listed nowhere (neither signed nor staged) are deleted.
    """
    done: list[str] = []
    waiting = session.scalars(sa.select(ModelArtifact).where(ModelArtifact.published.is_(False))).all()
    if not waiting and not purge_revoked:
        return done  # the refresh job's usual run: nothing staged, no metadata to read
    listed = repo.list_targets()
    for artifact in waiting:
        info = listed.get(artifact.target_path)
        if info is None or info.hashes.get("sha256") != artifact.sha256:
            continue
        artifact.published = True
        version = artifact.version
        if version.status == VersionStatus.pending:
            version.status = VersionStatus.active
        done.append(f"{version.model.name}@{version.version} ({artifact.variant})")
    session.flush()
    if purge_revoked:
        revoked = session.scalars(
            sa.select(ModelArtifact)
            .join(ModelVersion, ModelArtifact.version_id == ModelVersion.id)
            .where(ModelVersion.status == VersionStatus.revoked)
        ).all()
        for artifact in revoked:
            if artifact.target_path in listed:
                continue
            info = TargetFile(artifact.length, {"sha256": artifact.sha256}, artifact.target_path)
            if repo.purge_target_file(info):
                log.info("deleted the file of revoked target %s", artifact.target_path)
    if done:
        log.info("now listed in the signed targets metadata: %s", ", ".join(done))
    return done


class SigningService:
    def __init__(self, session: Session, ctx: ServerContext) -> None:
        self.session = session
        self.ctx = ctx
        self.repo = ctx.repo

    def _out(self, staged: Metadata[Targets]) -> StagedTargetsOut:
        listed, unlisted = self.repo.staged_changes(staged)
        current = self.repo.expires()[Targets.type]
        return StagedTargetsOut(
            metadata=staged.to_dict(),
            version=staged.signed.version,
            current_version=self.repo.versions()[Targets.type],
            current_expires=current,
            lifetime_s=int(self.repo.lifetimes[Targets.type].total_seconds()),
            listed=[_staged_target(t) for t in listed.values()],
            unlisted=[_staged_target(t) for t in unlisted.values()],
        )

    def staged(self) -> StagedTargetsOut:
        staged = self.repo.staged_targets()
        if staged is None:
            raise NotFound(
                "nothing is staged for the targets key (push or revoke with the key offline, or "
                "stage a renewal)"
            )
        return self._out(staged)

    def stage_renewal(self, by: Principal) -> StagedTargetsOut:
        """Stage the current targets for re-signing (a new expiry); what is staged already stays."""
        had = self.repo.staged_targets() is not None
        staged = self.repo.stage_renewal()
        if not had:
            audit(self.session, by, "repository.targets_staged", "repository", "targets",
                  {"version": staged.signed.version, "reason": "renewal"})
        return self._out(staged)

    def publish_signed(self, data: bytes, by: Principal) -> SignedTargetsOut:
        """Publish the staged targets signed offline, then reconcile the catalog with them."""
        try:
            listed, unlisted = self.repo.publish_signed_targets(data)
        except StagingError as exc:
            raise Conflict(str(exc)) from None
        except SignatureRejected as exc:
            raise Invalid(str(exc)) from None
        published = reconcile_published(self.session, self.repo)
        version = self.repo.versions()[Targets.type]
        expires = self.repo.expires()[Targets.type]
        audit(self.session, by, "repository.targets_signed", "repository", "targets", {
            "version": version,
            "expires": expires.isoformat(),
            "listed": sorted(listed),
            "unlisted": sorted(unlisted),
        })
        return SignedTargetsOut(
            version=version, expires=expires, published=published, unlisted=sorted(unlisted)
        )
