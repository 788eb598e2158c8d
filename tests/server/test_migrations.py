"""Alembic migrations build the schema on every backend, and match the ORM models exactly."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from server.db import create_db_engine, load_all_tables
from server.migrate import upgrade_head


def test_upgrade_head_matches_models(database_url):
    upgrade_head(database_url)
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, load_all_tables())
            tables = set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations differ; run alembic revision --autogenerate: {diff}"
    assert {"devices", "model_versions", "audit_log", "alembic_version"} <= tables


def test_upgrade_is_idempotent(database_url):
    upgrade_head(database_url)
    upgrade_head(database_url)
