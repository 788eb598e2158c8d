"""Keep ``health_windows`` bounded: fold old raw windows into ``health_rollups``, then delete them.

A rollup holds, per (device, model, version, mode, bucket), the sums the rollout gates need
(requests, errors, requests with a p95 and the request-weighted p95 sum, shadow requests with an
agreement and the agreement-weighted sum, and the hybrid routing counts with their weighted rates:
:func:`fold_routing`, requests with a CPU time and the request-weighted CPU time sum) and the
variant of its windows (resident memory stays in the raw windows), so sums over rollups equal sums
over the raw windows they replace.
:class:`server.health.repository.HealthWindowRepository` reads both (``per_device``, the gates'
per-device sums, and ``windows``), so rollout gates and baselines keep working past the raw
retention (at bucket resolution for rolled-up time).

:func:`fold_health` runs in the server every ``health_rollup_interval_s`` (``HealthRollupJob``).
Windows are claimed with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so replicas folding at the same
time split the work and never count a window twice; a window arriving late for an already folded
bucket is added to the existing rollup (upsert).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from device_client.loop import BackgroundLoop
from server.db import utcnow
from server.health.repository import HealthRollupRepository

if TYPE_CHECKING:
    from server.db import Database

log = logging.getLogger(__name__)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def bucket_of(at: datetime, bucket_s: int) -> datetime:
    seconds = int((at - EPOCH).total_seconds())
    return EPOCH + timedelta(seconds=seconds - seconds % bucket_s)


@dataclass
class FoldResult:
    folded: int = 0
    rollups: int = 0
    expired_rollups: int = 0


def fold_batch(raw: list[Any], bucket_s: int) -> list[dict[str, Any]]:
    """Rollup rows (with sums) of raw windows, one per (device, model, version, mode, bucket)."""
    out: dict[tuple[str, str, str, str, datetime], dict[str, Any]] = {}
    for w in raw:
        bucket = bucket_of(w.at, bucket_s)
        key = (w.device_id, w.model, w.version, w.mode, bucket)
        r = out.get(key)
        if r is None:
            r = out[key] = {
                "device_id": w.device_id, "model": w.model, "version": w.version, "mode": w.mode,
                "bucket": bucket, "bucket_s": bucket_s, "windows": 0, "requests": 0, "errors": 0,
                "p95_requests": 0, "p95_weighted_ms": 0.0, "shadow_requests": 0, "agreement_weighted": 0.0,
                **dict.fromkeys(ROUTING_SUMS, 0), "cloud_agreement_weighted": 0.0,
                "cloud_p95_weighted_ms": 0.0, "variant": None, "cpu_requests": 0, "cpu_weighted_ms": 0.0,
            }  # fmt: skip
        r["windows"] += 1
        r["requests"] += w.requests
        r["errors"] += w.errors
        if w.p95_ms is not None and w.requests:
            r["p95_requests"] += w.requests
            r["p95_weighted_ms"] += w.p95_ms * w.requests
        if w.shadow_requests and w.agreement is not None:
            r["shadow_requests"] += w.shadow_requests
            r["agreement_weighted"] += w.agreement * w.shadow_requests
        fold_routing(r, w)
        if w.variant is not None:
            r["variant"] = w.variant  # (raw windows come oldest first: the last one's)
        if w.cpu_ms_per_request is not None and w.requests:
            r["cpu_requests"] += w.requests
            r["cpu_weighted_ms"] += w.cpu_ms_per_request * w.requests
    return list(out.values())


#: the integer sums of routing fields a rollup keeps
ROUTING_SUMS = (
    "routed_requests", "answered_edge", "answered_cloud", "answered_cache", "escalations", "budget_limited",
    "breaker_open", "cloud_failed", "cloud_compared", "cloud_p95_calls",
)  # fmt: skip
#: routing counts summed as they come (a window without one adds nothing)
_COUNTS = (
    "answered_edge", "answered_cloud", "answered_cache", "budget_limited", "breaker_open", "cloud_failed",
)  # fmt: skip


def fold_routing(r: dict[str, Any], w: Any) -> None:
    """Add raw window ``w``'s hybrid routing fields to rollup row ``r``: its requests count towards
    the escalation rate when it reports escalations; its comparisons weight its cloud agreement and
    its cloud p95 (the successful cloud calls, as near as a window tells)."""
    for name in _COUNTS:
        r[name] += getattr(w, name) or 0
    if w.escalations is not None:
        r["routed_requests"] += w.requests
        r["escalations"] += w.escalations
    if w.cloud_compared and w.cloud_agreement is not None:
        r["cloud_compared"] += w.cloud_compared
        r["cloud_agreement_weighted"] += w.cloud_agreement * w.cloud_compared
    if w.cloud_compared and w.cloud_p95_ms is not None:
        r["cloud_p95_calls"] += w.cloud_compared
        r["cloud_p95_weighted_ms"] += w.cloud_p95_ms * w.cloud_compared


def fold_health(
    db: Database,
    *,
    raw_retention_s: int,
    bucket_s: int,
    rollup_retention_s: int,
    now: datetime | None = None,
    batch: int = 20000,
) -> FoldResult:
    """Fold every raw window older than the retention (rounded down to a bucket boundary, so only
    whole buckets are folded) into rollups and delete it; delete expired rollups. One
    transaction per ``batch`` windows."""
    now = now or utcnow()
    cutoff = bucket_of(now - timedelta(seconds=raw_retention_s), bucket_s)
    result = FoldResult()
    while True:
        with db.session_scope() as session:
            repo = HealthRollupRepository(session)
            raw = repo.claim_raw(cutoff, batch, skip_locked=not db.is_sqlite)
            if not raw:
                break
            rollups = fold_batch(raw, bucket_s)
            repo.add_rollups(rollups)
            repo.delete_raw([w.id for w in raw])
        result.folded += len(raw)
        result.rollups += len(rollups)
        if len(raw) < batch:
            break
    with db.session_scope() as session:
        result.expired_rollups = HealthRollupRepository(session).delete_rollups_before(
            now - timedelta(seconds=rollup_retention_s)
        )
    return result


class HealthRollupJob:
    """:func:`fold_health` every ``interval_s`` in a background thread of the server."""

    def __init__(self, db: Database, settings: Any) -> None:
        self.db = db
        self.settings = settings
        self._stop = threading.Event()
        self._loop = BackgroundLoop(
            "health-rollup",
            self.run_once,
            self._stop,
            failure="health rollup failed; retrying next interval",
            interval_s=settings.health_rollup_interval_s,
            logger=log,
        )

    def run_once(self, now: datetime | None = None) -> FoldResult:
        s = self.settings
        result = fold_health(
            self.db,
            raw_retention_s=s.health_raw_retention_s,
            bucket_s=s.health_rollup_bucket_s,
            rollup_retention_s=s.health_rollup_retention_s,
            now=now,
        )
        if result.folded or result.expired_rollups:
            log.info(
                "health rollup: folded %d windows into %d rollups; deleted %d expired rollups",
                result.folded, result.rollups, result.expired_rollups,
            )  # fmt: skip
        return result

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._stop.set()
        self._loop.join(30)
