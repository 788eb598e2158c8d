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


def test_downgrading_the_rollout_row_version_keeps_the_deployments(database_url):
    """0005's downgrade drops one column; on SQLite a batch rebuild of ``rollouts`` would have
    cascaded (foreign keys on) into every deployment."""
    from alembic import command

    from server.migrate import alembic_config

    upgrade_head(database_url)
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO rollouts (id, model, version, status, selector, stages, gates, probation, "
                "on_failure, max_concurrent_downloads, device_timeout_s, current_stage, verdict, "
                "created_at, updated_at) VALUES ('r1', 'det', '1.0.0', 'running', '{}', '[]', '{}', '{}', "
                "'pause', 5, 60, 0, '{}', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            ))  # fmt: skip
            conn.execute(sa.text(
                "INSERT INTO devices (id, status, hardware, arch, cert_serial, cert_not_after, token_hash, "
                "created_at, serving, last_report_seq, desired_seq) VALUES ('d1', 'online', '{}', 'x86_64', "
                "'01', '2027-01-01 00:00:00', 'h', '2026-01-01 00:00:00', '{}', 0, 0)"
            ))  # fmt: skip
            conn.execute(sa.text(
                "INSERT INTO deployments (rollout_id, device_id, stage, model, version, phase, details, "
                "created_at, updated_at) VALUES ('r1', 'd1', 0, 'det', '1.0.0', 'pending', '{}', "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            ))  # fmt: skip
        command.downgrade(alembic_config(database_url), "0004")
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM deployments")) == 1
            assert "row_version" not in {c["name"] for c in sa.inspect(conn).get_columns("rollouts")}
        upgrade_head(database_url)
    finally:
        engine.dispose()


def test_admin_tokens_made_before_expiry_existed_never_expire(database_url):
    """0008 adds ``admin_tokens.expires_at``: tokens made before it keep working (NULL: until
    revoked), and its downgrade drops only the column."""
    from alembic import command

    from server.admin.service import AdminService
    from server.db import Database
    from server.migrate import alembic_config
    from server.security import hash_secret

    command.upgrade(alembic_config(database_url), "0007")
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO admin_tokens (id, name, role, secret_hash, created_at) VALUES "
                "('0123456789ab', 'old', 'admin', :h, '2026-01-01 00:00:00')"
            ), {"h": hash_secret("s" * 43)})  # fmt: skip
        upgrade_head(database_url)
        db = Database(database_url)
        try:
            with db.session_scope() as session:
                principal = AdminService(session).authenticate(f"fa.0123456789ab.{'s' * 43}")
                assert principal.token_id == "0123456789ab"
                assert AdminService(session).list_tokens()[0].expires_at is None
        finally:
            db.dispose()
        command.downgrade(alembic_config(database_url), "0007")
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM admin_tokens")) == 1
            assert "expires_at" not in {c["name"] for c in sa.inspect(conn).get_columns("admin_tokens")}
        upgrade_head(database_url)
    finally:
        engine.dispose()
