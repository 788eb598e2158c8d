"""Scratch PostgreSQL databases for tests and benchmarks: one created next to a base URL's, and
dropped (connections closed by force) when done."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import sqlalchemy as sa


def fresh_postgres_database(base_url: str, prefix: str = "fleet_test") -> tuple[str, Callable[[], None]]:
    """Create an empty database next to ``base_url``'s; return its URL and a dropper."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(base_url).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop
