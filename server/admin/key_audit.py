"""Audit rows of key changes made on the server host (``fleet keys ...``, actor ``cli``).

The rows go to the database ``fleet admin token create`` uses (``FLEET_DATABASE_URL``, default
SQLite in ``FLEET_DATA_DIR``), opened and migrated to head the same way. Details name roles, key
ids and versions; never key material or key paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from server.admin.service import CLI_PRINCIPAL, audit
from server.db import Database
from server.migrate import upgrade_head


class KeyAuditError(Exception):
    """The audit database cannot be opened, or a key change's row was not written to it."""


def open_audit_db(database_url: str) -> Database:
    """The audit database, migrated to head. Raises SQLAlchemyError or OSError when it cannot be
    opened."""
    upgrade_head(database_url)
    return Database(database_url)


def record_key_change(database_url: str, action: str, target_id: str, details: dict[str, Any]) -> None:
    """One row (target ``key``/TARGET_ID) for a change already made to the key files; raises
    :class:`KeyAuditError` when the database cannot be written (the change stands)."""
    try:
        db = open_audit_db(database_url)
        try:
            with db.session_scope() as session:
                audit(session, CLI_PRINCIPAL, action, "key", target_id, details)
        finally:
            db.dispose()
    except (SQLAlchemyError, OSError) as exc:
        raise KeyAuditError(f"audit row {action} not written: {exc}") from exc


@contextlib.contextmanager
def key_audit(database_url: str, action: str, role: str) -> Iterator[dict[str, Any]]:
    """Record the key change the body makes (target ``key``/ROLE).

    The database is opened *before* the body runs: when it cannot be, :class:`KeyAuditError` is
    raised and nothing is changed. The body fills in the yielded details; the row is written once
    the body has succeeded, and not at all when it fails. A row that cannot be written after the
    change is a :class:`KeyAuditError` too.
    """
    where = make_url(database_url).render_as_string(hide_password=True)
    try:
        db = open_audit_db(database_url)
    except (SQLAlchemyError, OSError) as exc:
        raise KeyAuditError(f"cannot open the audit database {where}: {exc}. No key was changed.") from exc
    try:
        details: dict[str, Any] = {"role": role}
        yield details
        try:
            with db.session_scope() as session:
                audit(session, CLI_PRINCIPAL, action, "key", role, details)
        except SQLAlchemyError as exc:
            raise KeyAuditError(
                f"the key change is done, but its audit row ({action}) was not written to {where}: {exc}"
            ) from exc
    finally:
        db.dispose()
