"""Plausibility of a device's health windows, checked at ingest before a window is stored.

Pure: the ingest feeds each window, the time it arrived and the windows already stored. A window
that fails a check is rejected (counted in ``fleet_mqtt_rejected_total{kind="health",reason}``):
errors beyond its requests, more requests than ``window_s`` allows at ``health_max_rps``, a window
longer than ``health_max_window_s``, a stamp off the server's clock by more than
``health_max_clock_skew_s``, hybrid routing counts beyond its requests or a cloud agreement without
the comparisons behind it, a CPU time or resident memory no device can have (negative values never
parse), or a span that overlaps one already stored (one window per device,
model, version and mode for any period of time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from device_client.protocol import HealthWindow

#: overlap allowed between two windows of a key (clock jitter between a device's windows): this
#: many seconds, and never more than half the shorter window
OVERLAP_TOLERANCE_S = 1.0


@dataclass(frozen=True)
class Limits:
    """What a window may claim (the server's ``health_max_*`` settings)."""

    max_rps: float
    max_window_s: float
    max_clock_skew_s: float


def implausible(h: HealthWindow, received_at: datetime, limits: Limits) -> tuple[str, str] | None:
    """``(reason, detail)`` if ``h`` cannot be a true window, else None (checks of the window alone)."""
    if h.errors > h.requests:
        return "implausible_errors", f"{h.errors} errors > {h.requests} requests"
    if h.window_s > limits.max_window_s:
        return "implausible_window", f"window_s {h.window_s:g} > {limits.max_window_s:g}"
    allowed = math.ceil(limits.max_rps * h.window_s)
    busiest = max(h.requests, h.shadow_requests or 0)
    if busiest > allowed:
        return "implausible_rate", f"{busiest} requests in {h.window_s:g}s (at most {allowed})"
    routing = implausible_routing(h)
    if routing is not None:
        return "implausible_routing", routing
    resources = implausible_resources(h)
    if resources is not None:
        return "implausible_resources", resources
    skew = abs((h.at - received_at).total_seconds())
    if skew > limits.max_clock_skew_s:
        return "clock_skew", f"stamped {h.at.isoformat()}, {skew:.0f}s from the server's clock"
    return None


#: CPU threads a window's CPU time may span (more than any edge device has)
MAX_CPU_THREADS = 1024
#: resident memory beyond which a window is refused (16 TiB)
MAX_RSS_BYTES = 1 << 44


def implausible_resources(h: HealthWindow) -> str | None:
    """What is wrong with ``h``'s CPU time and resident memory, or None: a CPU time per request
    without requests, or more CPU time over the window than :data:`MAX_CPU_THREADS` threads have
    in ``window_s``, or a resident memory beyond :data:`MAX_RSS_BYTES`."""
    cpu = h.cpu_ms_per_request
    if cpu is not None:
        if not math.isfinite(cpu):
            return f"cpu_ms_per_request {cpu} is not finite"
        if h.requests == 0:
            return f"cpu_ms_per_request {cpu:g} without requests"
        budget_ms = h.window_s * 1000 * MAX_CPU_THREADS
        if cpu * h.requests > budget_ms:
            total = f"cpu_ms_per_request {cpu:g} x {h.requests} requests"
            return f"{total} > {budget_ms:g} ms of CPU in {h.window_s:g}s"
    if h.rss_bytes is not None and h.rss_bytes > MAX_RSS_BYTES:
        return f"rss_bytes {h.rss_bytes} > {MAX_RSS_BYTES}"
    return None


#: routing counts of a window, each counting requests of the window (so none exceeds them)
ROUTING_COUNTS = (
    "answered_edge", "answered_cloud", "answered_cache", "escalations", "budget_limited", "breaker_open",
    "cloud_failed", "cloud_compared",
)  # fmt: skip


def implausible_routing(h: HealthWindow) -> str | None:
    """What is wrong with ``h``'s hybrid routing fields, or None: a count beyond the window's
    requests, a rate outside [0, 1], a cloud agreement without comparisons (or the reverse)."""
    for name in ROUTING_COUNTS:
        value = getattr(h, name)
        if value is not None and value > h.requests:
            return f"{name} {value} > {h.requests} requests"
    for name in ("escalation_rate", "cloud_agreement"):
        value = getattr(h, name)
        if value is not None and not 0.0 <= value <= 1.0:
            return f"{name} {value} is not in [0, 1]"
    compared = h.cloud_compared or 0
    if (h.cloud_agreement is None) != (compared == 0):
        return f"cloud_agreement {h.cloud_agreement} with cloud_compared {h.cloud_compared}"
    return None


@dataclass(frozen=True)
class Span:
    """A window's key and period: ``[at - window_s, at]``."""

    key: tuple[str, str, str, str]  # device, model, version, mode
    seq: int
    start: datetime
    end: datetime

    @classmethod
    def of(cls, device_id: str, model: str, version: str, mode: str, seq: int, at: datetime,
           window_s: float) -> Span:  # fmt: skip
        return cls((device_id, model, version, mode), seq, at - timedelta(seconds=window_s), at)

    @classmethod
    def of_window(cls, h: HealthWindow) -> Span:
        return cls.of(h.device_id, h.model, h.version, h.mode.value, h.seq, h.at, h.window_s)

    def overlaps(self, other: Span) -> bool:
        """The two periods share more than the tolerance (a window re-sent under its own seq is a
        duplicate, not an overlap: the store ignores it)."""
        if other.key != self.key or other.seq == self.seq:
            return False
        shared = (min(self.end, other.end) - max(self.start, other.start)).total_seconds()
        shortest = min((self.end - self.start).total_seconds(), (other.end - other.start).total_seconds())
        return shared > min(OVERLAP_TOLERANCE_S, shortest / 2)


def span_queries(windows: Iterable[HealthWindow], grain_s: int = 60) -> list[tuple[list[str], datetime]]:
    """``(device ids, after)`` pairs that together fetch every stored window that may overlap one
    of ``windows`` (those ending after its start): windows grouped by the minute they start in,
    so that one window claiming a long period widens the query of its own group only."""
    groups: dict[int, tuple[set[str], datetime]] = {}
    for h in windows:
        start = Span.of_window(h).start
        slot = int(start.timestamp()) // grain_s
        ids, after = groups.get(slot, (set(), start))
        ids.add(h.device_id)
        groups[slot] = (ids, min(after, start))
    return [(sorted(ids), after) for _, (ids, after) in sorted(groups.items())]


def overlapping(windows: list[HealthWindow], stored: Iterable[Any]) -> list[int]:
    """Indexes of ``windows`` (in order) whose span overlaps a stored window's or an earlier
    accepted one's of the same device, model, version and mode. ``stored``: rows with
    device_id, model, version, mode, seq, at and window_s."""
    by_key: dict[tuple[str, str, str, str], list[Span]] = {}
    for r in stored:
        span = Span.of(r.device_id, r.model, r.version, r.mode, r.seq, r.at, r.window_s)
        by_key.setdefault(span.key, []).append(span)
    rejected: list[int] = []
    for i, h in enumerate(windows):
        span = Span.of_window(h)
        taken = by_key.setdefault(span.key, [])
        if any(span.overlaps(other) for other in taken):
            rejected.append(i)
            continue
        taken.append(span)
    return rejected
