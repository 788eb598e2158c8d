"""0009 and 0010 add the hybrid routing columns in place: rows stored before keep their data
(windows without routing fields, rollups whose routing sums are 0, rollouts without a policy), and
the downgrades drop only those columns."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command

from server.db import create_db_engine
from server.migrate import alembic_config, upgrade_head

ROWS = (
    "INSERT INTO rollouts (id, model, version, status, selector, stages, gates, probation, on_failure, "
    "max_concurrent_downloads, device_timeout_s, current_stage, verdict, created_at, updated_at, "
    "row_version) VALUES ('r1', 'det', '1.0.0', 'running', '{}', '[]', '{}', '{}', 'pause', 5, 60, 0, '{}', "
    "'2026-01-01 00:00:00', '2026-01-01 00:00:00', 1)",
    "INSERT INTO health_windows (device_id, seq, at, window_s, model, version, mode, requests, errors) "
    "VALUES ('d1', 1, '2026-01-01 00:00:00', 10, 'det', '1.0.0', 'serve', 100, 1)",
    "INSERT INTO health_rollups (device_id, model, version, mode, bucket, bucket_s, windows, requests, "
    "errors, p95_requests, p95_weighted_ms, shadow_requests, agreement_weighted) VALUES ('d1', 'det', "
    "'1.0.0', 'serve', '2026-01-01 00:00:00', 3600, 3, 300, 2, 300, 1500.0, 0, 0.0)",
)


def columns(conn, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(conn).get_columns(table)}


def test_rows_stored_before_keep_their_data_both_ways(database_url):
    config = alembic_config(database_url)
    command.upgrade(config, "0008")
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            for statement in ROWS:
                conn.execute(sa.text(statement))
        upgrade_head(database_url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT routing, previous_routing FROM rollouts")).one() in (
                (None, {}), (None, "{}"),  # JSONB, or SQLite's JSON text
            )  # fmt: skip
            window = conn.execute(
                sa.text("SELECT requests, escalations, cloud_agreement FROM health_windows")
            )
            assert window.one() == (100, None, None)
            rollup = conn.execute(sa.text("SELECT requests, routed_requests, escalations, cloud_compared, "
                                          "cloud_agreement_weighted FROM health_rollups"))  # fmt: skip
            assert rollup.one() == (300, 0, 0, 0, 0.0)
        command.downgrade(config, "0008")
        with engine.connect() as conn:
            assert "routing" not in columns(conn, "rollouts")
            assert "escalations" not in columns(conn, "health_windows")
            assert "routed_requests" not in columns(conn, "health_rollups")
            for table in ("rollouts", "health_windows", "health_rollups"):
                assert conn.scalar(sa.text(f"SELECT count(*) FROM {table}")) == 1, table
        upgrade_head(database_url)
    finally:
        engine.dispose()
