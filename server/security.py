"""Bearer secrets: ``<prefix>.<id>.<secret>`` tokens, stored as SHA-256 of the secret.

Secrets carry 256 bits of entropy, so a plain SHA-256 (not a password KDF) is enough to make a
stolen database useless for authentication; comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import TypeVar

from server.errors import Unauthorized

T = TypeVar("T")

ADMIN_PREFIX = "fa"
ENROLL_PREFIX = "fe"
DEVICE_PREFIX = "fd"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def verify_secret(secret: str, expected_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), expected_hash)


def new_id() -> str:
    return secrets.token_hex(6)


def new_token(prefix: str, ident: str) -> tuple[str, str]:
    """A fresh token for ``ident`` and the hash to store: ``(token, secret_hash)``."""
    secret = secrets.token_urlsafe(32)
    return f"{prefix}.{ident}.{secret}", hash_secret(secret)


def parse_token(token: str, prefix: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed token with ``prefix``, else None."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != prefix or not parts[1] or len(parts[2]) < 16:
        return None
    return parts[1], parts[2]


def authenticate_token(
    token: str, prefix: str, kind: str, lookup: Callable[[str], T | None], secret_hash: Callable[[T], str]
) -> T:
    """The row a ``<prefix>.<id>.<secret>`` bearer names, if the secret matches its stored hash.

    ``lookup(id)`` fetches the row, ``secret_hash(row)`` its stored hash; a malformed token or an
    unknown id/secret is :class:`Unauthorized` (``"malformed {kind} token"`` /
    ``"unknown {kind} token"``). Revocation and other state checks are the caller's.
    """
    parsed = parse_token(token, prefix)
    if parsed is None:
        raise Unauthorized(f"malformed {kind} token")
    ident, secret = parsed
    row = lookup(ident)
    if row is None or not verify_secret(secret, secret_hash(row)):
        raise Unauthorized(f"unknown {kind} token")
    return row
