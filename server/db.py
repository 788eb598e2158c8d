"""Database plumbing: declarative base, column types, engine and the session unit of work.

No module-level engine: :class:`Database` is built in the app lifespan (or by a CLI command) from
``Settings`` and handed around explicitly. Only :meth:`Database.session_scope` (and the HTTP
session dependency built on it) commits.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: every domain's ORM module; importing them registers their tables on ``Base.metadata``
TABLE_MODULES = (
    "server.admin.tables",
    "server.devices.tables",
    "server.catalog.tables",
    "server.rollouts.tables",
    "server.health.tables",
    "server.examples.tables",
)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    #: every class here maps one declared table (DeclarativeBase types it as any FromClause)
    __table__: ClassVar[sa.Table]


def load_all_tables() -> sa.MetaData:
    """Import every domain's tables module and return the complete metadata."""
    for name in TABLE_MODULES:
        importlib.import_module(name)
    return Base.metadata


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: JSON on SQLite, JSONB on PostgreSQL
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def json_dumps(value: Any) -> str:
    """JSON columns' encoder: orjson (a rollout writes tens of thousands of JSON values a second;
    the stdlib encoder was the largest cost of signing DesiredStates in bulk), falling back to the
    stdlib for what orjson refuses (integers past 64 bits), so anything json.dumps accepted still
    works."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value)


def create_db_engine(url: str) -> Engine:
    """An engine for ``url`` with the settings each backend needs."""
    codec: dict[str, Any] = {"json_serializer": json_dumps, "json_deserializer": orjson.loads}
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **codec)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, **codec)


_AFTER_COMMIT = "fleet_after_commit"
_ON_ROLLBACK = "fleet_on_rollback"


def after_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run ``fn`` once the unit of work owning ``session`` has committed (e.g. flush an outbox)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(fn)


def on_rollback(session: Session, fn: Callable[[], None]) -> None:
    """Run ``fn`` if the unit of work rolls back: the compensation of a side effect outside the DB
    (for example, un-publishing a TUF target written before the commit)."""
    session.info.setdefault(_ON_ROLLBACK, []).append(fn)


def _run_hooks(session: Session, key: str) -> None:
    hooks = session.info.pop(key, [])
    session.info.pop(_AFTER_COMMIT if key == _ON_ROLLBACK else _ON_ROLLBACK, None)
    for fn in hooks:
        fn()


OUTBOX_DIRTY = "fleet_outbox_dirty"


class Database:
    """Engine plus session factory; the only place sessions are committed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_db_engine(url)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        #: called after a commit that wrote outbox rows (the MQTT outbox publisher's kick)
        self.outbox_listener: Callable[[], None] | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session_scope(self) -> Iterator[Session]:
        """One unit of work: commit on success (then after-commit hooks), roll back on error
        (then compensation hooks), always close."""
        session = self.sessionmaker()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            _run_hooks(session, _ON_ROLLBACK)
            raise
        else:
            dirty = session.info.pop(OUTBOX_DIRTY, False)
            _run_hooks(session, _AFTER_COMMIT)
            if dirty and self.outbox_listener is not None:
                self.outbox_listener()
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()
