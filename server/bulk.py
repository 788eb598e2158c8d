"""Batched SQL for hot paths (MQTT ingest, the rollout engine): one statement for many rows.

Each helper runs one prepared statement for many plain-dict rows inside the caller's transaction.
:func:`execute_many` hands the rows to the driver itself, applying each column's bind processor and
Python-side default here: SQLAlchemy's per-row parameter building costs several times what SQLite
spends writing the row (docs/benchmarks.md, "Rollout fan-out").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def execute_many(session: Session, stmt: sa.Executable, rows: Sequence[Mapping[str, Any]]) -> int:
    """``session.execute(stmt, rows)`` without SQLAlchemy's per-row cost (see docs/benchmarks.md).

    Every row has the same keys. A statement the fast path does not cover (a SQL-expression or
    sequence default, a dialect with another parameter style) runs through SQLAlchemy unchanged.
    Returns the rows the driver reports changed, summed over all rows (sqlite3 and psycopg 3).
    """
    if not rows:
        return 0
    conn = session.connection()
    dialect = conn.dialect
    # qmark: SQLite; pyformat: psycopg 3, which pipelines an executemany (10,000 DesiredStates
    # signed on PostgreSQL: 3.2 s against 3.5 s through SQLAlchemy's multi-row VALUES)
    fast = dialect.paramstyle in ("qmark", "pyformat")
    plan = _driver_plan(stmt, dialect, list(rows[0])) if fast else None
    if plan is None:
        return session.execute(stmt, list(rows)).rowcount  # type: ignore[attr-defined]  # DML: a CursorResult
    sql, columns = plan
    if dialect.paramstyle == "qmark":
        params: list[Any] = [
            tuple(
                (conv(row[name]) if conv is not None else row[name]) if fixed is _FROM_ROW else fixed
                for name, conv, fixed in columns
            )
            for row in rows
        ]
    else:
        params = [
            {
                name: (conv(row[name]) if conv is not None else row[name]) if fixed is _FROM_ROW else fixed
                for name, conv, fixed in columns
            }
            for row in rows
        ]
    return conn.exec_driver_sql(sql, params).rowcount


_FROM_ROW = object()


def _driver_plan(
    stmt: sa.Executable, dialect: sa.Dialect, keys: list[str]
) -> tuple[str, list[tuple[str, Callable[[Any], Any] | None, Any]]] | None:
    """(SQL, [(bind name, bind processor, fixed value or _FROM_ROW)] in parameter order), or None
    when the statement needs what only SQLAlchemy's own execution does."""
    compiled = stmt.compile(dialect=dialect, column_keys=keys)  # type: ignore[attr-defined]  # DML: a ClauseElement
    fixed: dict[str, Any] = {}
    for cols, attr in ((compiled.insert_prefetch, "default"), (compiled.update_prefetch, "onupdate")):
        for col in cols:
            default = getattr(col, attr)
            if default is None:
                fixed[col.key] = None
            elif default.is_scalar:
                fixed[col.key] = default.arg
            elif default.is_callable:
                fixed[col.key] = default.arg(None)  # utcnow, dict: one value for the whole batch
            else:
                return None
    if compiled.postfetch:
        return None
    if compiled.positiontup is not None:
        names = list(compiled.positiontup)
    elif not getattr(compiled, "escaped_bind_names", None):
        names = list(compiled.binds)  # named style: the SQL says %(name)s for each
    else:
        return None
    columns: list[tuple[str, Callable[[Any], Any] | None, Any]] = []
    for name in names:
        bind = compiled.binds[name]
        conv = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if name in keys:
            columns.append((name, conv, _FROM_ROW))
        elif name in fixed:
            columns.append((name, None, conv(fixed[name]) if conv is not None else fixed[name]))
        elif bind.value is not None or not bind.required:
            value = bind.effective_value
            columns.append((name, None, conv(value) if conv is not None else value))
        else:
            return None
    return compiled.string, columns


def insert_ignore(
    session: Session, table: sa.Table, rows: Sequence[dict[str, object]], keys: list[str]
) -> None:
    """Multi-row INSERT that skips rows violating the unique ``keys`` (PostgreSQL and SQLite)."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    ins = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    execute_many(session, ins.on_conflict_do_nothing(index_elements=keys), rows)


def bulk_update(session: Session, table: sa.Table, rows: Sequence[dict[str, Any]], key: str = "id") -> int:
    """Update many rows of ``table`` by ``key``, each with its own values; return the row count.

    Each dict holds ``key`` plus the columns to set. Rows setting the same columns share one
    prepared UPDATE executed for all of them (executemany), in their order: psycopg 3 pipelines it
    on PostgreSQL, and it measured ~8x faster there than ``UPDATE ... FROM (VALUES ...)`` built by
    SQLAlchemy (whose compilation of thousands of bound parameters dominates: 2,000 devices in
    0.08 s against 0.7 s). Rows that set other columns get an UPDATE of their own, so a caller
    sets only what changed (a row with nothing but its key is skipped). Column ``onupdate``
    defaults (``updated_at``) apply as with any UPDATE.
    """
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(c for c in r if c != key), []).append(r)
    groups.pop((), None)
    for columns, group in groups.items():
        stmt = (
            sa.update(table)
            .where(table.c[key] == sa.bindparam("k__"))
            .values({c: sa.bindparam(f"v__{c}", type_=table.c[c].type) for c in columns})
        )
        execute_many(session, stmt, [{"k__": r[key], **{f"v__{c}": r[c] for c in columns}} for r in group])
    return len(rows)
