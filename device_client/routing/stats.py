"""Counters of the routing layer for one health window: who answered (edge, cloud, cache), why
the cloud was not asked (budget, breaker) or failed, escalations, audits, the cloud round trip and
the edge/cloud agreement. Thread-safe; :meth:`RoutingStats.drain` ends the window."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from ..health import percentile_ms

AnswerPath = Literal["edge", "cloud", "cache"]
#: answer paths and the reasons a wanted cloud answer did not come (per-path counts)
PATH_FIELDS = ("edge", "cloud", "cache", "budget_limited", "breaker_open", "cloud_failed")
EVENT_FIELDS = (
    "requests",
    "escalations",
    "cloud_calls",
    "audits",
    "audits_dropped",
    "audits_skipped",
    "audits_failed",
    "cache_write_skipped",
    "confidence_errors",
)


class RoutingStats:
    """One window's routing numbers. Round trips are kept as a reservoir of ``max_samples``."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_samples: int = 4096) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._cap = max_samples
        self._rng = random.Random()
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self._started = now
        self._counts: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._rtt_ns: list[int] = []
        self._rtt_seen = 0
        self._compared = 0
        self._matches = 0

    # ------------------------------------------------------------------ recording

    def answered(self, path: AnswerPath) -> None:
        """One request answered, by ``path``."""
        with self._lock:
            self._counts["requests"] += 1
            self._counts[path] += 1

    def count(self, name: str, n: int = 1) -> None:
        """A plain event: ``escalations``, ``budget_limited``, ``breaker_open``, ``audits``, ..."""
        with self._lock:
            self._counts[name] += n

    def cloud_failed(self, kind: str) -> None:
        """A request's cloud call failed (``kind`` of :class:`~.oip.CloudFailure`)."""
        with self._lock:
            self._counts["cloud_failed"] += 1
            self._failures[kind] += 1

    def cloud_round_trip(self, ms: float) -> None:
        """A successful cloud call took ``ms`` (escalations and audits)."""
        ns = int(ms * 1e6)
        with self._lock:
            self._rtt_seen += 1
            if len(self._rtt_ns) < self._cap:
                self._rtt_ns.append(ns)
            else:
                j = int(self._rng.random() * self._rtt_seen)
                if j < self._cap:
                    self._rtt_ns[j] = ns

    def compared(self, agreed: bool) -> None:
        """An edge answer compared with the cloud's for the same input."""
        with self._lock:
            self._compared += 1
            self._matches += int(agreed)

    # ------------------------------------------------------------------ reading

    def _fields(self, now: float) -> dict[str, Any]:
        counts = self._counts
        requests = counts["requests"]
        doc: dict[str, Any] = {"window_s": max(now - self._started, 0.0)}
        doc.update({f: counts[f] for f in EVENT_FIELDS})
        doc.update({f: counts[f] for f in PATH_FIELDS})
        doc["escalation_rate"] = counts["escalations"] / requests if requests else None
        doc["cloud_p95_ms"] = percentile_ms(sorted(self._rtt_ns), 0.95)
        doc["cloud_compared"] = self._compared
        doc["cloud_matches"] = self._matches
        doc["cloud_agreement"] = self._matches / self._compared if self._compared else None
        doc["cloud_failures"] = dict(self._failures)
        return doc

    def snapshot(self) -> dict[str, Any]:
        """The window so far, without ending it."""
        with self._lock:
            return self._fields(self._clock())

    def drain(self) -> dict[str, Any]:
        """The window's fields, and a new window: ``requests``, the per-path counts ``edge``,
        ``cloud``, ``cache``, ``budget_limited``, ``breaker_open``, ``cloud_failed`` (with
        ``cloud_failures`` by kind), ``escalations`` and ``escalation_rate``, ``cloud_calls``,
        ``cloud_p95_ms``, ``cloud_compared``/``cloud_matches``/``cloud_agreement``, the audit
        counts, ``cache_write_skipped``, ``confidence_errors`` and ``window_s``. Rates and
        percentiles are None when there was nothing to measure."""
        with self._lock:
            now = self._clock()
            doc = self._fields(now)
            self._reset(now)
            return doc
