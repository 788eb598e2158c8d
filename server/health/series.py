"""Health of a set of devices over time, per model version and mode, in fixed time buckets:
what ``GET /api/v1/rollouts/{id}/health`` returns and the dashboard charts. Raw windows and
rollups are folded alike (a rollup counts in the bucket its own bucket start falls in)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from server.health.repository import DeviceFilter, ids_filter
from server.health.tables import HealthRollup, HealthSample


@dataclass
class _Sums:
    requests: int = 0
    errors: int = 0
    p95_requests: int = 0
    p95_weighted: float = 0.0
    shadow: int = 0
    agreement_weighted: float = 0.0
    routed: int = 0
    escalations: int = 0
    cloud_compared: int = 0
    cloud_agreement_weighted: float = 0.0
    cpu_requests: int = 0
    cpu_weighted: float = 0.0
    rss_bytes: int | None = None
    devices: set[str] = field(default_factory=set)

    def point(self, at: datetime) -> dict[str, Any]:
        return {
            "at": at.isoformat(),
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "p95_ms": self.p95_weighted / self.p95_requests if self.p95_requests else None,
            "agreement": self.agreement_weighted / self.shadow if self.shadow else None,
            "escalation_rate": self.escalations / self.routed if self.routed else None,
            "cloud_agreement": (
                self.cloud_agreement_weighted / self.cloud_compared if self.cloud_compared else None
            ),
            "routed_requests": self.routed,
            "cloud_compared": self.cloud_compared,
            "cpu_ms_per_request": self.cpu_weighted / self.cpu_requests if self.cpu_requests else None,
            "rss_bytes": self.rss_bytes,
            "devices": len(self.devices),
        }


def fold_series(rows: Iterable[Sequence[Any]], start: datetime, bucket_s: int) -> list[dict[str, Any]]:
    """Rows ``(device_id, version, mode, at, requests, errors, p95_requests, p95_weighted_ms,
    shadow_requests, agreement_weighted, cpu_requests, cpu_weighted_ms, rss_bytes, routed_requests,
    escalations, cloud_compared, cloud_agreement_weighted)`` folded into one series per (version,
    mode), each a list of points per ``bucket_s`` bucket from ``start``: p95 weighted by requests,
    agreement by shadow requests, CPU time per request by the requests that reported it, the largest
    resident memory (which only raw windows keep), the escalation rate by the requests of windows
    under a routing policy and the cloud agreement by the edge answers compared with the cloud's."""
    buckets: dict[tuple[str, str], dict[int, _Sums]] = {}
    for row in rows:
        device_id, version, mode, at, req, err, p95_req, p95_w, shadow, agr_w = row[:10]
        cpu_req, cpu_w, rss = row[10:13]
        routed, escalations, compared, cloud_w = row[13:17]
        index = max(0, int((at - start).total_seconds() // bucket_s))
        s = buckets.setdefault((version, mode), {}).setdefault(index, _Sums())
        s.requests += int(req)
        s.errors += int(err)
        s.p95_requests += int(p95_req)
        s.p95_weighted += float(p95_w)
        s.shadow += int(shadow)
        s.agreement_weighted += float(agr_w)
        s.cpu_requests += int(cpu_req)
        s.cpu_weighted += float(cpu_w)
        if rss is not None:
            s.rss_bytes = max(s.rss_bytes or 0, int(rss))
        s.routed += int(routed)
        s.escalations += int(escalations)
        s.cloud_compared += int(compared)
        s.cloud_agreement_weighted += float(cloud_w)
        s.devices.add(device_id)
    series = []
    for (version, mode), points in sorted(buckets.items()):
        series.append({
            "version": version, "mode": mode,
            "points": [points[i].point(_at(start, i * bucket_s)) for i in sorted(points)],
        })  # fmt: skip
    return series


def _at(start: datetime, offset_s: int) -> datetime:
    return datetime.fromtimestamp(start.timestamp() + offset_s, tz=UTC)


def health_rows(
    session: Session, device_ids: Sequence[str], model: str, since: datetime
) -> list[Sequence[Any]]:
    """The raw windows and rollups of ``device_ids`` for ``model`` since ``since``, as rows for
    :func:`fold_series`."""
    if not device_ids:
        return []
    return health_rows_of(session, ids_filter(session, list(dict.fromkeys(device_ids))), model, since)


def health_rows_of(
    session: Session, of_devices: DeviceFilter, model: str, since: datetime
) -> list[Sequence[Any]]:
    """:func:`health_rows` of the devices ``of_devices`` lets through (an id list or a subquery)."""
    h, r = HealthSample, HealthRollup
    has_p95 = h.p95_ms.is_not(None)
    has_agreement = sa.and_(h.shadow_requests > 0, h.agreement.is_not(None))
    has_cpu = h.cpu_ms_per_request.is_not(None)
    has_escalations = h.escalations.is_not(None)
    has_cloud = sa.and_(h.cloud_compared > 0, h.cloud_agreement.is_not(None))
    raw = sa.select(
        h.device_id, h.version, h.mode, h.at, h.requests, h.errors,
        sa.case((has_p95, h.requests), else_=0),
        sa.case((has_p95, h.p95_ms * h.requests), else_=0.0),
        sa.case((has_agreement, h.shadow_requests), else_=0),
        sa.case((has_agreement, h.agreement * h.shadow_requests), else_=0.0),
        sa.case((has_cpu, h.requests), else_=0),
        sa.case((has_cpu, h.cpu_ms_per_request * h.requests), else_=0.0), h.rss_bytes,
        sa.case((has_escalations, h.requests), else_=0), sa.func.coalesce(h.escalations, 0),
        sa.case((has_cloud, h.cloud_compared), else_=0),
        sa.case((has_cloud, h.cloud_agreement * h.cloud_compared), else_=0.0),
    ).where(h.model == model, of_devices(h.device_id), h.at >= since)  # fmt: skip
    rolled = sa.select(
        r.device_id, r.version, r.mode, r.bucket, r.requests, r.errors, r.p95_requests,
        r.p95_weighted_ms, r.shadow_requests, r.agreement_weighted, r.cpu_requests, r.cpu_weighted_ms,
        sa.cast(sa.null(), sa.BigInteger), r.routed_requests, r.escalations, r.cloud_compared,
        r.cloud_agreement_weighted,
    ).where(r.model == model, of_devices(r.device_id), r.bucket >= since)  # fmt: skip
    return [tuple(row) for q in (raw, rolled) for row in session.execute(q)]
