"""Queries for admin tokens and the audit log."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.orm import Session

from server.admin.tables import AdminToken, AuditEntry


class AdminTokenRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, token_id: str) -> AdminToken | None:
        return self.session.get(AdminToken, token_id)

    def add(self, token: AdminToken) -> AdminToken:
        self.session.add(token)
        self.session.flush()
        return token

    def list(self, include_revoked: bool = False) -> Sequence[AdminToken]:
        q = sa.select(AdminToken).order_by(AdminToken.created_at, AdminToken.id)
        if not include_revoked:
            q = q.where(AdminToken.revoked_at.is_(None))
        return self.session.scalars(q).all()


class AuditRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, entry: AuditEntry) -> None:
        self.session.add(entry)

    def page(
        self, *, before_id: int | None, limit: int, action: str | None = None, target_id: str | None = None
    ) -> Sequence[AuditEntry]:
        """Newest first, keyset-paginated by id."""
        q = sa.select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if before_id is not None:
            q = q.where(AuditEntry.id < before_id)
        if action:
            q = q.where(AuditEntry.action == action)
        if target_id:
            q = q.where(AuditEntry.target_id == target_id)
        return self.session.scalars(q).all()
