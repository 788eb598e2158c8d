"""PostgreSQL's statistics of ``deployments`` after a large rollout's rows are inserted: refreshed
in the same transaction, so the status view's joins are planned for the real row count."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from server.devices.tables import Device
from server.rollouts.repository import ANALYZE_AFTER, DeploymentRepository
from tests.helpers.device_rows import device_row


def _deployments(ids: list[str], now: datetime) -> list[dict]:
    return [
        {"rollout_id": None, "device_id": d, "stage": 0, "model": "det", "version": "2.0.0",
         "phase": "pending", "details": {}, "created_at": now, "updated_at": now}
        for d in ids
    ]  # fmt: skip


def _reltuples(s) -> float:
    return float(s.scalar(sa.text("SELECT reltuples FROM pg_class WHERE relname = 'deployments'")))


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_large_insert_refreshes_the_planner_statistics(ctx) -> None:
    now = datetime.now(UTC)
    ids = [f"stat-{i:05d}" for i in range(ANALYZE_AFTER + 10)]
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(Device.__table__), [device_row(d, now) for d in ids])
        DeploymentRepository(s).insert_many(_deployments(ids[:10], now))
        assert _reltuples(s) < ANALYZE_AFTER  # a small insert leaves them to autovacuum
        DeploymentRepository(s).insert_many(_deployments(ids[10:], now))
        assert _reltuples(s) >= ANALYZE_AFTER + 10
