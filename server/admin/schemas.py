"""API schemas of admin tokens and the audit log."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from server.admin.tables import Role

#: the longest lifetime an admin token may be given (without one it lasts until revoked)
MAX_TOKEN_TTL_S = 10 * 365 * 86400
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """``90s``, ``15m``, ``12h``, ``30d`` or plain seconds as seconds (1 s to 10 years); ValueError
    for anything else."""
    m = re.fullmatch(r"([0-9]{1,10})([smhd]?)", text.strip().lower(), re.ASCII)
    if m is None:
        raise ValueError(f"invalid TTL {text!r}: a number with an optional unit s, m, h or d (30d, 12h)")
    seconds = int(m.group(1)) * _TTL_UNITS[m.group(2) or "s"]
    if not 1 <= seconds <= MAX_TOKEN_TTL_S:
        raise ValueError(f"invalid TTL {text!r}: between 1 s and {MAX_TOKEN_TTL_S // 86400} days")
    return seconds


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
    #: lifetime in seconds; none: until revoked
    ttl_s: int | None = Field(default=None, ge=1, le=MAX_TOKEN_TTL_S)


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    role: Role
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    #: None: valid until revoked
    expires_at: datetime | None = None


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
