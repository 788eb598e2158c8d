"""Storing the health windows devices publish (MQTT ingest): a device reports each period once,
so a window whose period overlaps one already stored (or an earlier one of the same batch) for the
same device, model, version and mode is refused; the rest are inserted (a re-sent window, under its
own seq, is left to the store to ignore). Whether a window is plausible at all is decided before,
on parsing (:mod:`server.health.plausibility`).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from device_client.protocol import HealthWindow
from server.bulk import insert_ignore
from server.health.plausibility import overlapping, span_queries
from server.health.repository import HealthWindowRepository
from server.health.tables import RESOURCE_FIELDS, ROUTING_FIELDS, HealthSample


def store_windows(session: Session, windows: list[HealthWindow]) -> list[HealthWindow]:
    """Insert ``windows`` except those that overlap a stored or earlier window; return those."""
    if not windows:
        return []
    repo = HealthWindowRepository(session)
    stored = [row for ids, after in span_queries(windows) for row in repo.spans(ids, after)]
    rejected = set(overlapping(windows, stored))
    rows = [
        {
            "device_id": h.device_id,
            "seq": h.seq,
            "at": h.at,
            "window_s": h.window_s,
            "model": h.model,
            "version": h.version,
            "mode": h.mode.value,
            "requests": h.requests,
            "errors": h.errors,
            "p50_ms": h.p50_ms,
            "p95_ms": h.p95_ms,
            "p99_ms": h.p99_ms,
            "shadow_requests": h.shadow_requests,
            "agreement": h.agreement,
            "shadow_p95_ms": h.shadow_p95_ms,
            **{f: getattr(h, f) for f in ROUTING_FIELDS},
            **{f: getattr(h, f) for f in RESOURCE_FIELDS},
        }
        for i, h in enumerate(windows)
        if i not in rejected
    ]
    insert_ignore(session, HealthSample.__table__, rows, ["device_id", "seq"])
    return [windows[i] for i in sorted(rejected)]
