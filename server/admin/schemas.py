"""API schemas of admin tokens and the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from server.admin.tables import Role


class Principal(BaseModel):
    """Who is calling: an admin token (or ``cli`` for local commands)."""

    model_config = ConfigDict(frozen=True)

    actor: str
    role: Role
    token_id: str | None = None
    name: str | None = None


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    role: Role


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    role: Role
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class TokenCreated(TokenOut):
    #: shown once; only its hash is stored
    token: str


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    details: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditOut]
    next_cursor: str | None
