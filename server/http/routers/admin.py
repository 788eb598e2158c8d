"""Admin tokens and the audit log."""

from __future__ import annotations

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from server.admin.schemas import AuditPage, Principal, TokenCreate, TokenCreated, TokenOut
from server.admin.service import AdminService
from server.http.deps import Admin, Operator, SessionDep

router = APIRouter(prefix="/api/v1", tags=["admin"])


@router.get("/admin/tokens")
def list_tokens(
    include_revoked: bool = False, session: Session = SessionDep, _: Principal = Admin
) -> list[TokenOut]:
    return AdminService(session).list_tokens(include_revoked)


@router.post("/admin/tokens", status_code=201)
def create_token(body: TokenCreate, session: Session = SessionDep, who: Principal = Admin) -> TokenCreated:
    return AdminService(session).create_token(body.name, body.role, who, body.ttl_s)


@router.delete("/admin/tokens/{token_id}")
def revoke_token(token_id: str, session: Session = SessionDep, who: Principal = Admin) -> TokenOut:
    return AdminService(session).revoke_token(token_id, who)


@router.get("/audit")
def audit_log(
    cursor: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
    action: str | None = None,
    target_id: str | None = None,
    session: Session = SessionDep,
    _: Principal = Operator,
) -> AuditPage:
    return AdminService(session).audit_page(cursor, limit, action, target_id)
