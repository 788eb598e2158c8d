"""Queries of health windows and their rollups: per-device sums for the rollout gates, the windows
themselves, the spans the ingest checks new windows against, and the rollup job's claims and
upserts."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.health.sums import DeviceHealth
from server.health.tables import RESOURCE_FIELDS, ROUTING_FIELDS, HealthRollup, HealthSample

#: the columns of a rollup that add up when two rollups of the same key meet
SUMMED = (
    "windows", "requests", "errors", "p95_requests", "p95_weighted_ms", "shadow_requests",
    "agreement_weighted", "routed_requests", "answered_edge", "answered_cloud", "answered_cache",
    "escalations", "budget_limited", "breaker_open", "cloud_failed", "cloud_compared",
    "cloud_agreement_weighted", "cloud_p95_calls", "cloud_p95_weighted_ms", "cpu_requests", "cpu_weighted_ms",
)  # fmt: skip
KEY = ("device_id", "model", "version", "mode", "bucket")
#: routing counts the field-accuracy view sums as they come
ACCURACY_COUNTS = (
    "answered_edge", "answered_cloud", "answered_cache", "budget_limited", "breaker_open", "cloud_failed",
)  # fmt: skip
#: device ids per query where they go as an IN list (planners like lists in the thousands)
IDS_CHUNK = 5000


#: a filter of a device id column (:func:`ids_filter`)
DeviceFilter = Callable[[Any], sa.ColumnElement[bool]]


def ids_filter(session: Session, ids: Sequence[str]) -> DeviceFilter:
    """``column IN ids`` with the ids as ONE bound parameter however many there are: a text array
    (``= ANY(...)``) on PostgreSQL, a JSON array read by ``json_each`` on SQLite. Both use the
    ``device_id`` indexes; unlike an IN list of 10,000 parameters, nothing is compiled, bound or
    planned per id (that took ~60 ms a query on PostgreSQL at 10,000 devices)."""
    if session.get_bind().dialect.name == "postgresql":
        # an array literal in one text parameter: the driver would check every element of a list
        quoted = ('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in ids)
        literal = sa.bindparam(None, "{" + ",".join(quoted) + "}", type_=sa.Text)
        array = sa.cast(literal, postgresql.ARRAY(sa.String))
        return lambda column: column == sa.any_(array)
    listed = sa.bindparam(None, json.dumps(list(ids)), type_=sa.String)
    values = sa.select(sa.column("value", sa.String)).select_from(sa.func.json_each(listed)).scalar_subquery()
    return lambda column: column.in_(values)


@dataclass(frozen=True)
class WindowMatch:
    """Which health windows count: one model's, optionally of one version (or of every other
    version), one mode, and a span of time (rolled-up time is filtered by bucket start: its
    resolution is the bucket)."""

    model: str
    version: str | None = None
    not_version: str | None = None
    mode: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(
        self,
        raw: sa.Select[*tuple[Any, ...]],
        rolled: sa.Select[*tuple[Any, ...]],
        of_devices: DeviceFilter,
    ) -> tuple[sa.Select[*tuple[Any, ...]], sa.Select[*tuple[Any, ...]]]:
        """``raw`` (of :class:`HealthSample`) and ``rolled`` (of :class:`HealthRollup`) narrowed to
        the matching windows of the devices ``of_devices`` (:func:`ids_filter`) lets through."""
        h, r = HealthSample, HealthRollup
        raw = raw.where(h.model == self.model, of_devices(h.device_id))
        rolled = rolled.where(r.model == self.model, of_devices(r.device_id))
        if self.version is not None:
            raw, rolled = raw.where(h.version == self.version), rolled.where(r.version == self.version)
        if self.not_version is not None:
            raw = raw.where(h.version != self.not_version)
            rolled = rolled.where(r.version != self.not_version)
        if self.mode is not None:
            raw, rolled = raw.where(h.mode == self.mode), rolled.where(r.mode == self.mode)
        if self.since is not None:
            raw, rolled = raw.where(h.at >= self.since), rolled.where(r.bucket >= self.since)
        if self.until is not None:
            raw, rolled = raw.where(h.at < self.until), rolled.where(r.bucket < self.until)
        return raw, rolled


#: (requests, errors, p95_ms, shadow_requests, agreement) of one health window
Window = tuple[int, int, float | None, int | None, float | None]


class HealthWindowRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def per_device(
        self,
        device_ids: Sequence[str],
        model: str,
        *,
        version: str | None = None,
        not_version: str | None = None,
        mode: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> dict[str, DeviceHealth]:
        """Each device's sums over its matching windows, raw and rolled up (rolled-up time is
        filtered by bucket start): one GROUP BY, whatever the devices and windows. Devices without
        a matching window are absent."""
        if not device_ids:
            return {}
        of_devices = ids_filter(self.session, list(dict.fromkeys(device_ids)))
        match = WindowMatch(model, version, not_version, mode, since, until)
        return self.per_device_of(of_devices, match)

    def per_device_of(self, of_devices: DeviceFilter, match: WindowMatch) -> dict[str, DeviceHealth]:
        """:meth:`per_device` of the devices ``of_devices`` lets through (:func:`ids_filter`, or a
        subquery such as a rollout's deployments: nothing sent per device)."""
        out: dict[str, DeviceHealth] = {}
        q = self._sums(of_devices, match)
        for r in self.session.execute(q):
            out[r.device_id] = DeviceHealth(
                windows=int(r.windows), requests=int(r.requests), errors=int(r.errors),
                p95_requests=int(r.p95_requests), p95_weighted_ms=float(r.p95_weighted),
                shadow_requests=int(r.shadow), agreement_weighted=float(r.agreement_weighted),
                routed_requests=int(r.routed_requests), escalations=int(r.escalations),
                cloud_compared=int(r.cloud_compared),
                cloud_agreement_weighted=float(r.cloud_agreement_weighted),
                cpu_requests=int(r.cpu_requests), cpu_weighted_ms=float(r.cpu_weighted_ms),
                variant=r.variant,
            )  # fmt: skip
        return out

    @staticmethod
    def _sums(of_devices: DeviceFilter, match: WindowMatch) -> sa.Select[Any]:
        h, r = HealthSample, HealthRollup
        has_p95 = h.p95_ms.is_not(None)
        has_agreement = sa.and_(h.shadow_requests > 0, h.agreement.is_not(None))
        has_escalations = h.escalations.is_not(None)
        has_cloud = sa.and_(h.cloud_compared > 0, h.cloud_agreement.is_not(None))
        has_cpu = h.cpu_ms_per_request.is_not(None)
        raw, rolled = match.where(sa.select(
            h.device_id.label("device_id"), sa.literal(1).label("windows"), h.requests.label("requests"),
            h.errors.label("errors"), sa.case((has_p95, h.requests), else_=0).label("p95_requests"),
            sa.case((has_p95, h.p95_ms * h.requests), else_=0.0).label("p95_weighted"),
            sa.case((has_agreement, h.shadow_requests), else_=0).label("shadow"),
            sa.case((has_agreement, h.agreement * h.shadow_requests), else_=0.0).label("agreement_weighted"),
            sa.case((has_escalations, h.requests), else_=0).label("routed_requests"),
            sa.func.coalesce(h.escalations, 0).label("escalations"),
            sa.case((has_cloud, h.cloud_compared), else_=0).label("cloud_compared"),
            sa.case((has_cloud, h.cloud_agreement * h.cloud_compared), else_=0.0)
            .label("cloud_agreement_weighted"),
            sa.case((has_cpu, h.requests), else_=0).label("cpu_requests"),
            sa.case((has_cpu, h.cpu_ms_per_request * h.requests), else_=0.0).label("cpu_weighted_ms"),
            h.variant.label("variant"),
        ), sa.select(
            r.device_id, r.windows, r.requests, r.errors, r.p95_requests, r.p95_weighted_ms,
            r.shadow_requests, r.agreement_weighted, r.routed_requests, r.escalations, r.cloud_compared,
            r.cloud_agreement_weighted, r.cpu_requests, r.cpu_weighted_ms, r.variant,
        ), of_devices)  # fmt: skip
        u = sa.union_all(raw, rolled).subquery()
        sums = [sa.func.sum(c).label(c.name) for c in u.c if c.name not in ("device_id", "variant")]
        variant = sa.func.max(u.c.variant).label("variant")
        return sa.select(u.c.device_id, *sums, variant).group_by(u.c.device_id)

    def windows(
        self,
        device_ids: Sequence[str],
        model: str,
        *,
        version: str | None = None,
        not_version: str | None = None,
        mode: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[Window]:
        """Every matching health window, raw ones as they are and rolled-up ones (:mod:`server.health.rollup`)
        as equivalent windows, so :func:`server.rollouts.policy.aggregate` gives the same result
        before and after a fold. Only the windows of ``device_ids``, however many."""
        match = WindowMatch(model, version, not_version, mode, since, until)
        if not device_ids:
            return []
        return self._windows(ids_filter(self.session, list(dict.fromkeys(device_ids))), match)

    def _windows(self, of_devices: DeviceFilter, match: WindowMatch) -> list[Window]:
        h, r = HealthSample, HealthRollup
        raw, rolled = match.where(sa.select(
            h.requests.label("requests"), h.errors.label("errors"), h.p95_ms.label("p95"),
            h.shadow_requests.label("shadow"), h.agreement.label("agreement"),
            sa.cast(sa.null(), sa.BigInteger).label("p95_requests"), sa.literal(0).label("rollup"),
        ), sa.select(
            r.requests, r.errors, r.p95_weighted_ms, r.shadow_requests, r.agreement_weighted, r.p95_requests,
            sa.literal(1),
        ), of_devices)  # fmt: skip
        out: list[Window] = []
        for requests, errors, p95, shadow, agreement, p95_req, rollup in self.session.execute(
            sa.union_all(raw, rolled)
        ):
            if not rollup:
                out.append((requests, errors, p95, shadow, agreement))
                continue
            # a rollup (p95 and agreement columns hold weighted sums) as two equivalent windows: one
            # with the requests that had a p95 (and the errors), one with the rest, so aggregate()
            # weights p95 by the first one's requests only, as it did over the raw windows
            out.append((
                p95_req, errors, p95 / p95_req if p95_req else None,
                shadow, agreement / shadow if shadow else None,
            ))  # fmt: skip
            if requests - p95_req:
                out.append((requests - p95_req, 0, None, None, None))
        return out

    def accuracy_sums(self, model: str, since: datetime, until: datetime, bucket_s: int) -> list[Any]:
        """Per (version, bucket start in epoch seconds, a multiple of ``bucket_s``): the sums of the
        model's ``serve`` windows (raw, and rolled up at their bucket's start) from ``since`` to
        ``until``: requests and the hybrid routing sums (as a rollup keeps them). One GROUP BY
        of each table; rows of the same key from both are added up."""
        h, r = HealthSample, HealthRollup
        has_escalations = h.escalations.is_not(None)
        has_cloud = sa.and_(h.cloud_compared > 0, h.cloud_agreement.is_not(None))
        raw_cols = {
            "requests": h.requests,
            "routed_requests": sa.case((has_escalations, h.requests), else_=0),
            "escalations": sa.func.coalesce(h.escalations, 0),
            **{c: sa.func.coalesce(getattr(h, c), 0) for c in ACCURACY_COUNTS},
            "cloud_compared": sa.case((has_cloud, h.cloud_compared), else_=0),
            "cloud_agreement_weighted": sa.case((has_cloud, h.cloud_agreement * h.cloud_compared), else_=0.0),
        }
        out: dict[tuple[str, int], dict[str, Any]] = {}
        for table, at, cols in (
            (h, h.at, raw_cols),
            (r, r.bucket, {c: getattr(r, c) for c in raw_cols}),
        ):
            bucket = self._epoch_bucket(at, bucket_s)
            sums = [sa.func.sum(c).label(n) for n, c in cols.items()]
            q = (
                sa.select(table.version, bucket.label("bucket"), *sums)
                .where(table.model == model, table.mode == "serve", at >= since, at < until)
                .group_by(table.version, bucket)
            )
            for row in self.session.execute(q):
                acc = out.setdefault((row.version, int(row.bucket)), dict.fromkeys(raw_cols, 0))
                for name in raw_cols:
                    acc[name] += getattr(row, name) or 0
        return [{"version": v, "bucket": b, **acc} for (v, b), acc in sorted(out.items())]

    def _epoch_bucket(self, at: Any, bucket_s: int) -> sa.ColumnElement[Any]:
        """The start of ``at``'s bucket of ``bucket_s`` seconds, in epoch seconds (SQL)."""
        # inline, not a bound parameter: GROUP BY repeats the expression
        size: sa.ColumnElement[Any] = sa.literal_column(str(int(bucket_s)))
        if self.session.get_bind().dialect.name == "postgresql":
            return sa.func.floor(sa.extract("epoch", at) / size) * size
        return (sa.cast(sa.func.strftime("%s", at), sa.Integer) // size) * size

    def longest_window_s(self, device_ids: Sequence[str], since: datetime) -> float | None:
        """The longest ``window_s`` among the windows of (up to the first :data:`IDS_CHUNK` of)
        ``device_ids`` since ``since``: their health window setting, as far as it shows."""
        ids = sorted(set(device_ids))[:IDS_CHUNK]
        if not ids:
            return None
        h = HealthSample
        q = sa.select(sa.func.max(h.window_s)).where(h.device_id.in_(ids), h.at >= since)
        value = self.session.scalar(q)
        return None if value is None else float(value)

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
                t.shadow_requests, t.agreement, *(getattr(t, f) for f in ROUTING_FIELDS + RESOURCE_FIELDS),
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
            set_={
                **{c: table.c[c] + getattr(ins.excluded, c) for c in SUMMED},
                "variant": sa.func.coalesce(ins.excluded.variant, table.c.variant),
            },
        )
        self.session.execute(stmt, list(rows))

    def delete_raw(self, ids: Sequence[int], chunk: int = 5000) -> None:
        for i in range(0, len(ids), chunk):
            self.session.execute(sa.delete(HealthSample).where(HealthSample.id.in_(list(ids[i : i + chunk]))))

    def delete_rollups_before(self, before: datetime) -> int:
        result = self.session.execute(sa.delete(HealthRollup).where(HealthRollup.bucket < before))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]  # DML: a CursorResult
