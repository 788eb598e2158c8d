"""Batched SQL for hot paths (MQTT ingest, the rollout engine): one statement for many rows.

PostgreSQL gets multi-row statements (``INSERT ... ON CONFLICT``, ``UPDATE ... FROM (VALUES ...)``);
SQLite gets ``executemany`` of one prepared statement, inside the caller's single transaction (on
WAL that is as fast as SQLite writes go). Callers pass plain dicts: no ORM objects, no unit of work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

#: PostgreSQL accepts at most 65,535 bind parameters per statement
_PG_MAX_PARAMS = 30000


def _chunks(rows: Sequence[dict[str, Any]], per_row: int) -> Iterator[Sequence[dict[str, Any]]]:
    size = max(1, _PG_MAX_PARAMS // max(1, per_row))
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def insert_ignore(
    session: Session, table: sa.Table, rows: Sequence[dict[str, object]], keys: list[str]
) -> None:
    """Multi-row INSERT that skips rows violating the unique ``keys`` (PostgreSQL and SQLite)."""
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        for chunk in _chunks(rows, len(rows[0])):  # one multi-row VALUES per chunk
            ins = postgresql.insert(table).values(list(chunk))
            session.execute(ins.on_conflict_do_nothing(index_elements=keys))
        return
    ins = sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
    session.execute(ins, list(rows))


def bulk_update(session: Session, table: sa.Table, rows: Sequence[dict[str, Any]], key: str = "id") -> int:
    """Update many rows of ``table`` by ``key``, each with its own values; return the row count.

    Every dict has the same keys: ``key`` plus the columns to set. Column ``onupdate`` defaults
    (``updated_at``) apply as with any UPDATE.
    """
    if not rows:
        return 0
    columns = [c for c in rows[0] if c != key]
    if session.get_bind().dialect.name == "postgresql":
        names = [key, *columns]
        for chunk in _chunks(rows, len(names)):
            v = sa.values(*[sa.column(n, table.c[n].type) for n in names], name="v").data(
                [tuple(r[n] for n in names) for r in chunk]
            )
            stmt = sa.update(table).where(table.c[key] == v.c[key]).values({c: v.c[c] for c in columns})
            session.execute(stmt)
        return len(rows)
    stmt = (
        sa.update(table)
        .where(table.c[key] == sa.bindparam("k__"))
        .values({c: sa.bindparam(f"v__{c}", type_=table.c[c].type) for c in columns})
    )
    session.execute(stmt, [{"k__": r[key], **{f"v__{c}": r[c] for c in columns}} for r in rows])
    return len(rows)
