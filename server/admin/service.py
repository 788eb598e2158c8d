"""Admin tokens (create, authenticate, revoke) and the audit log."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from server.admin.repository import AdminTokenRepository, AuditRepository
from server.admin.schemas import MAX_TOKEN_TTL_S, AuditOut, AuditPage, Principal, TokenCreated, TokenOut
from server.admin.tables import AdminToken, AuditEntry, Role
from server.db import utcnow
from server.errors import Invalid, NotFound, Unauthorized
from server.security import ADMIN_PREFIX, authenticate_token, new_id, new_token

#: the largest id (exclusive) a 64-bit signed INTEGER column holds, on SQLite and PostgreSQL alike
MAX_ID = 2**63
_ID_CURSOR_RE = re.compile(r"[0-9]{1,19}")


def parse_id_cursor(cursor: str, what: str) -> int:
    """A numeric paging cursor (a row id): ASCII digits only, ``0 < n < 2**63``; :class:`Invalid` else.

    ``int()`` alone would accept ``-5``, ``1_000``, non-ASCII digits and values too large for the
    database driver (SQLite raises OverflowError, a 500, for ints beyond 64 bits).
    """
    value = int(cursor) if _ID_CURSOR_RE.fullmatch(cursor) else 0
    if not 0 < value < MAX_ID:
        raise Invalid(f"malformed {what} {cursor[:40]!r}: expected an integer between 1 and {MAX_ID - 1}")
    return value


#: the principal of commands run on the server host itself (``fleet admin token create``)
CLI_PRINCIPAL = Principal(actor="cli", role=Role.admin)
#: lifetime of the admin tokens ``fleet demo`` and the embedded simulator make for themselves
BOOTSTRAP_TOKEN_TTL_S = 86400


def audit(
    session: Session,
    actor: Principal | str,
    action: str,
    target_type: str,
    target_id: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Record a state-changing action in the same transaction as the change itself."""
    AuditRepository(session).add(
        AuditEntry(
            actor=actor.actor if isinstance(actor, Principal) else actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            details=details or {},
        )
    )


class AdminService:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.tokens = AdminTokenRepository(session)

    def create_token(self, name: str, role: Role, by: Principal, ttl_s: int | None = None) -> TokenCreated:
        """A new token; with ``ttl_s`` (1 s to 10 years) it expires that many seconds from now."""
        if ttl_s is not None and not 1 <= ttl_s <= MAX_TOKEN_TTL_S:
            raise Invalid(f"ttl_s must be between 1 and {MAX_TOKEN_TTL_S} seconds")
        token_id = new_id()
        token, secret_hash = new_token(ADMIN_PREFIX, token_id)
        now = utcnow()
        expires_at = now + timedelta(seconds=ttl_s) if ttl_s is not None else None
        row = AdminToken(id=token_id, name=name, role=role, secret_hash=secret_hash, created_by=by.actor)
        row.created_at, row.expires_at = now, expires_at
        self.tokens.add(row)
        details: dict[str, Any] = {"name": name, "role": role.value}
        if expires_at is not None:
            details["expires_at"] = expires_at.isoformat()
        audit(self.session, by, "token.create", "admin_token", token_id, details)
        return TokenCreated(**TokenOut.model_validate(row).model_dump(), token=token)

    def list_tokens(self, include_revoked: bool = False) -> list[TokenOut]:
        return [TokenOut.model_validate(t) for t in self.tokens.list(include_revoked)]

    def revoke_token(self, token_id: str, by: Principal) -> TokenOut:
        row = self.tokens.get(token_id)
        if row is None:
            raise NotFound(f"no admin token {token_id!r}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            audit(self.session, by, "token.revoke", "admin_token", token_id)
        return TokenOut.model_validate(row)

    def authenticate(self, bearer: str) -> Principal:
        """The principal of a bearer token; :class:`Unauthorized` if unknown, malformed, revoked or
        expired."""
        row = authenticate_token(bearer, ADMIN_PREFIX, "admin", self.tokens.get, lambda t: t.secret_hash)
        if row.revoked_at is not None:
            raise Unauthorized("admin token has been revoked")
        now = utcnow()
        if row.expires_at is not None and now >= row.expires_at:
            raise Unauthorized(f"admin token expired at {row.expires_at:%Y-%m-%d %H:%M:%S} UTC")
        # keep last_used_at coarse so that reads do not write on every call
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            row.last_used_at = now
        return Principal(actor=f"token:{row.id}", role=row.role, token_id=row.id, name=row.name)

    def audit_page(
        self, cursor: str | None, limit: int, action: str | None, target_id: str | None
    ) -> AuditPage:
        before = parse_id_cursor(cursor, "audit cursor") if cursor else None
        rows = AuditRepository(self.session).page(
            before_id=before, limit=limit, action=action, target_id=target_id
        )
        items = [AuditOut.model_validate(r) for r in rows]
        next_cursor = str(items[-1].id) if len(items) == limit else None
        return AuditPage(items=items, next_cursor=next_cursor)
