"""Queries of health windows and their rollups: the spans the ingest checks new windows against,
and the rollup job's claims and upserts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.health.tables import HealthRollup, HealthSample

#: the columns of a rollup that add up when two rollups of the same key meet
SUMMED = (
    "windows", "requests", "errors", "p95_requests", "p95_weighted_ms", "shadow_requests",
    "agreement_weighted",
)  # fmt: skip
KEY = ("device_id", "model", "version", "mode", "bucket")
#: device ids per query (an IN list; planners like lists in the thousands)
IDS_CHUNK = 5000


class HealthWindowRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def spans(self, device_ids: Sequence[str], after: datetime) -> list[Any]:
        """Rows (device_id, model, version, mode, seq, at, window_s) of the stored windows of
        ``device_ids`` that end after ``after`` (the ``(device_id, at)`` index)."""
        ids = sorted(set(device_ids))
        h = HealthSample
        out: list[Any] = []
        for i in range(0, len(ids), IDS_CHUNK):
            q = sa.select(h.device_id, h.model, h.version, h.mode, h.seq, h.at, h.window_s).where(
                h.device_id.in_(ids[i : i + IDS_CHUNK]), h.at > after
            )
            out.extend(self.session.connection().execute(q))
        return out


class HealthRollupRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def claim_raw(self, before: datetime, limit: int, *, skip_locked: bool) -> list[Any]:
        """Raw windows older than ``before`` (oldest ids first), locked for this transaction on
        PostgreSQL with ``SKIP LOCKED``: two replicas folding at once never fold a window twice."""
        t = HealthSample
        q = (
            sa.select(
                t.id, t.device_id, t.model, t.version, t.mode, t.at, t.requests, t.errors, t.p95_ms,
                t.shadow_requests, t.agreement,
            )
            .where(t.at < before)
            .order_by(t.id)
            .limit(limit)
        )  # fmt: skip
        if skip_locked:
            q = q.with_for_update(skip_locked=True)
        return list(self.session.execute(q))

    def add_rollups(self, rows: Sequence[dict[str, Any]]) -> None:
        """Upsert rollups, adding the sums to an existing row of the same key (late windows)."""
        if not rows:
            return
        table = HealthRollup.__table__
        dialect = self.session.get_bind().dialect.name
        ins = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
        stmt = ins.on_conflict_do_update(
            index_elements=list(KEY),
            set_={c: table.c[c] + getattr(ins.excluded, c) for c in SUMMED},  # type: ignore[attr-defined]
        )
        self.session.execute(stmt, list(rows))

    def delete_raw(self, ids: Sequence[int], chunk: int = 5000) -> None:
        for i in range(0, len(ids), chunk):
            self.session.execute(sa.delete(HealthSample).where(HealthSample.id.in_(list(ids[i : i + chunk]))))

    def delete_rollups_before(self, before: datetime) -> int:
        result = self.session.execute(sa.delete(HealthRollup).where(HealthRollup.bucket < before))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
