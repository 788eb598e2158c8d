"""The fleet's field accuracy of a model: per version and time bucket, how many requests its
devices served, how many were escalated to the cloud, and how often the edge answer matched the
cloud's (:class:`FieldAccuracyService`), from the stored health windows and their rollups."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from server.catalog.repository import CatalogRepository
from server.db import utcnow
from server.errors import Invalid, NotFound
from server.health.repository import HealthWindowRepository
from server.health.schemas import AccuracyBucket, FieldAccuracyOut, VersionAccuracy

#: the default span of the view, and the most buckets one answer holds
DEFAULT_SPAN = timedelta(hours=24)
MAX_BUCKETS = 10_000
_SUMMED = (
    "requests", "routed_requests", "escalations", "cloud_compared", "answered_edge", "answered_cloud",
    "answered_cache", "budget_limited", "breaker_open", "cloud_failed",
)  # fmt: skip


def figures(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """:class:`server.health.schemas.AccuracyFigures` fields from sum rows: counts added, rates
    from the sums (the escalation rate over the requests that reported escalations, the cloud
    agreement weighted by comparisons)."""
    acc: dict[str, Any] = dict.fromkeys(_SUMMED, 0)
    weighted = 0.0
    for row in rows:
        for name in _SUMMED:
            acc[name] += int(row[name])
        weighted += float(row["cloud_agreement_weighted"])
    acc["escalation_rate"] = acc["escalations"] / acc["routed_requests"] if acc["routed_requests"] else None
    acc["cloud_agreement"] = weighted / acc["cloud_compared"] if acc["cloud_compared"] else None
    return acc


class FieldAccuracyService:
    def __init__(self, session: Session) -> None:
        self.session = session

    def field_accuracy(self, model: str, since: datetime | None, bucket_s: int) -> FieldAccuracyOut:
        catalog = CatalogRepository(self.session)
        row = catalog.get_model(model)
        if row is None:
            raise NotFound(f"no model {model!r}")
        until = utcnow()
        since = until - DEFAULT_SPAN if since is None else since
        since = since.replace(tzinfo=UTC) if since.tzinfo is None else since
        if since >= until:
            raise Invalid(f"since {since.isoformat()} is not in the past")
        if (until - since).total_seconds() / bucket_s > MAX_BUCKETS:
            raise Invalid(f"{since.isoformat()} to now is more than {MAX_BUCKETS} buckets of {bucket_s}s")
        rows = HealthWindowRepository(self.session).accuracy_sums(model, since, until, bucket_s)
        releases = {v.version: v.release for v in catalog.list_versions(row.id)}
        versions = []
        for version in sorted({r["version"] for r in rows}, key=lambda v: (-releases.get(v, 0), v)):
            mine = [r for r in rows if r["version"] == version]
            buckets = [
                AccuracyBucket(start=datetime.fromtimestamp(r["bucket"], UTC), **figures([r])) for r in mine
            ]
            versions.append(VersionAccuracy(version=version, buckets=buckets, **figures(mine)))
        return FieldAccuracyOut(model=model, since=since, until=until, bucket_s=bucket_s, versions=versions)
