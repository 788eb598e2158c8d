"""Inference health: a cheap thread-safe recorder and the pure probation rule.

:class:`HealthRecorder` times and counts every request (errors: exceptions and non-finite outputs),
and sums the CPU time of those measured, into the window published every ``health_window_s`` (a
swap cuts it, so no window mixes two versions) and into the period since the last swap, which
probation judges with exact counts and reservoir-sampled percentiles. :func:`evaluate_probation`
passes, fails or continues a probation (docs/architecture.md, "Device health and probation").
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from .protocol import HealthWindow, Probation, ServeMode

MIN_SAMPLE = 20
#: closed window segments (cut at swaps) kept until the next health publication
MAX_CLOSED = 16


def percentile_ms(sorted_ns: list[int], q: float) -> float | None:
    """Nearest-rank percentile (0 < q <= 1) of sorted nanosecond latencies, in milliseconds."""
    if not sorted_ns:
        return None
    idx = max(math.ceil(q * len(sorted_ns)) - 1, 0)
    return sorted_ns[idx] / 1e6


@dataclass(frozen=True)
class WindowStats:
    """Health numbers over one window (or one period since a mark)."""

    window_s: float
    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    shadow_requests: int = 0
    shadow_agreed: int = 0
    shadow_errors: int = 0
    shadow_dropped: int = 0
    shadow_p95_ms: float | None = None
    #: mean CPU time per request of the requests whose CPU time was measured (None: none was)
    cpu_ms_per_request: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def agreement(self) -> float | None:
        return self.shadow_agreed / self.shadow_requests if self.shadow_requests else None

    def shadow_candidate(self) -> WindowStats:
        """The shadow candidate's own window: its requests, errors and p95 as the main numbers."""
        return WindowStats(
            window_s=self.window_s,
            requests=self.shadow_requests,
            errors=self.shadow_errors,
            p50_ms=None,
            p95_ms=self.shadow_p95_ms,
            p99_ms=None,
            shadow_requests=self.shadow_requests,
            shadow_agreed=self.shadow_agreed,
            shadow_errors=self.shadow_errors,
            shadow_p95_ms=self.shadow_p95_ms,
        )

    def to_health_window(
        self,
        *,
        device_id: str,
        seq: int,
        at: datetime,
        model: str,
        version: str,
        mode: ServeMode,
        variant: str | None = None,
        rss_bytes: int | None = None,
    ) -> HealthWindow:
        shadow = mode is ServeMode.shadow
        return HealthWindow.build(
            device_id=device_id,
            seq=seq,
            at=at,
            window_s=max(self.window_s, 1e-6),
            model=model,
            version=version,
            mode=mode,
            requests=self.requests,
            errors=self.errors,
            p50_ms=self.p50_ms,
            p95_ms=self.p95_ms,
            p99_ms=self.p99_ms,
            shadow_requests=self.shadow_requests if shadow else None,
            agreement=self.agreement if shadow else None,
            shadow_p95_ms=self.shadow_p95_ms if shadow else None,
            variant=variant,
            cpu_ms_per_request=None if shadow else self.cpu_ms_per_request,
            rss_bytes=rss_bytes,
        )


@dataclass
class _Acc:
    started: float
    latencies: list[int] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    shadow_latencies: list[int] = field(default_factory=list)
    shadow_requests: int = 0
    shadow_agreed: int = 0
    shadow_errors: int = 0
    shadow_dropped: int = 0
    #: CPU time summed over the requests whose CPU time was measured, and their count
    cpu_ns: int = 0
    cpu_requests: int = 0

    def stats(self, now: float) -> WindowStats:
        lat = sorted(self.latencies)
        sl = sorted(self.shadow_latencies)
        return WindowStats(
            window_s=now - self.started,
            requests=self.requests,
            errors=self.errors,
            p50_ms=percentile_ms(lat, 0.50),
            p95_ms=percentile_ms(lat, 0.95),
            p99_ms=percentile_ms(lat, 0.99),
            shadow_requests=self.shadow_requests,
            shadow_agreed=self.shadow_agreed,
            shadow_errors=self.shadow_errors,
            shadow_dropped=self.shadow_dropped,
            shadow_p95_ms=percentile_ms(sl, 0.95),
            cpu_ms_per_request=self.cpu_ns / self.cpu_requests / 1e6 if self.cpu_requests else None,
        )


class HealthRecorder:
    """Thread-safe, low-overhead request/shadow counters with a window and a since-mark period."""

    def __init__(
        self,
        *,
        reservoir_size: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._cap = reservoir_size
        self._rng = random.Random(seed)
        now = clock()
        self._win = _Acc(now)
        self._period = _Acc(now)
        self._closed: list[tuple[str, WindowStats]] = []

    def _sample(self, reservoir: list[int], seen: int, value: int) -> None:
        # Algorithm R: after ``seen`` items, each is in the reservoir with probability cap/seen
        if len(reservoir) < self._cap:
            reservoir.append(value)
        else:
            j = int(self._rng.random() * seen)
            if j < self._cap:
                reservoir[j] = value

    def record(self, latency_ns: int, ok: bool = True, cpu_ns: int | None = None) -> None:
        """One served request (``ok=False``: it raised or returned non-finite outputs); ``cpu_ns``:
        the CPU time its inference took, when it was measured."""
        with self._lock:
            win, per = self._win, self._period
            win.latencies.append(latency_ns)
            win.requests += 1
            per.requests += 1
            if cpu_ns is not None:
                win.cpu_ns += cpu_ns
                win.cpu_requests += 1
            if not ok:
                win.errors += 1
                per.errors += 1
            self._sample(per.latencies, per.requests, latency_ns)

    def record_shadow(self, latency_ns: int, agreed: bool, error: bool = False) -> None:
        """One shadow comparison (``error``: the candidate raised or produced non-finite outputs)."""
        with self._lock:
            for acc in (self._win, self._period):
                acc.shadow_requests += 1
                acc.shadow_agreed += int(agreed)
                acc.shadow_errors += int(error)
            self._win.shadow_latencies.append(latency_ns)
            self._sample(self._period.shadow_latencies, self._period.shadow_requests, latency_ns)

    def record_shadow_drop(self) -> None:
        """A sampled request not shadowed because the shadow queue was full."""
        with self._lock:
            self._win.shadow_dropped += 1
            self._period.shadow_dropped += 1

    def snapshot_and_reset(self) -> WindowStats:
        """Stats of the window since the previous call; starts a new window."""
        with self._lock:
            now = self._clock()
            win, self._win = self._win, _Acc(now)
        return win.stats(now)

    def reset_shadow_window(self) -> None:
        """Drop the current window's shadow comparisons (a new candidate starts: the window is
        published under the candidate shadowing at that time, so it must hold only its samples)."""
        with self._lock:
            win = self._win
            win.shadow_latencies = []
            win.shadow_requests = win.shadow_agreed = win.shadow_errors = win.shadow_dropped = 0

    def mark(self, cut: str | None = None) -> None:
        """Start a new period (at a swap): ``since_mark`` then covers only the new model.

        ``cut``: the version that served until now. The window's served requests so far are closed
        into a segment labelled ``cut`` (see :meth:`drain_closed`); its shadow comparisons stay in
        the window (they belong to the shadow candidate, which a swap does not change). At most
        :data:`MAX_CLOSED` segments wait to be drained; older ones are dropped (windows are QoS 0)."""
        served: _Acc | None = None
        with self._lock:  # O(1) under the lock: requests record under it, and this is a swap
            now = self._clock()
            self._period = _Acc(now)
            if cut is None:
                return
            win = self._win
            if win.requests:
                served = _Acc(win.started, win.latencies, win.requests, win.errors)
                served.cpu_ns, served.cpu_requests = win.cpu_ns, win.cpu_requests
            win.started, win.latencies, win.requests, win.errors = now, [], 0, 0
            win.cpu_ns = win.cpu_requests = 0
        if served is not None:
            stats = served.stats(now)  # sorts the latencies: outside the lock
            with self._lock:
                self._closed.append((cut, stats))
                del self._closed[:-MAX_CLOSED]

    def drain_closed(self) -> list[tuple[str, WindowStats]]:
        """The segments cut at swaps since the last call: (version that served, its stats), oldest
        first."""
        with self._lock:
            closed, self._closed = self._closed, []
        return closed

    def since_mark(self) -> WindowStats:
        """Stats of the period since the last :meth:`mark` (percentiles from a reservoir sample)."""
        with self._lock:
            now = self._clock()
            per = self._period
            snapshot = _Acc(
                per.started,
                list(per.latencies),
                per.requests,
                per.errors,
                list(per.shadow_latencies),
                per.shadow_requests,
                per.shadow_agreed,
                per.shadow_errors,
                per.shadow_dropped,
            )
        return snapshot.stats(now)


class ProbationOutcome(StrEnum):
    continue_ = "continue"
    passed = "passed"
    failed = "failed"


@dataclass(frozen=True)
class ProbationVerdict:
    outcome: ProbationOutcome
    reasons: tuple[str, ...]
    numbers: dict[str, float | int | None]

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def evaluate_probation(
    stats: WindowStats,
    probation: Probation,
    baseline_p95_ms: float | None,
    elapsed_s: float,
) -> ProbationVerdict:
    """Judge a probation period: fail, pass, or continue.

    ``need = max(min_requests, MIN_SAMPLE)`` requests come before the error rate and p95 are judged,
    except that more than ``max_error_rate * need`` errors fail at once (the rate would breach the
    limit even if every remaining request succeeded). It fails on ``errors / requests >
    max_error_rate``, ``p95 > max_p95_ms`` or ``p95 / baseline_p95_ms > max_p95_ratio`` (every breach
    listed); passes once ``seconds`` have elapsed with at least ``min_requests`` requests (no traffic
    and ``min_requests = 0`` pass: no evidence of harm); otherwise continues, also past ``seconds``.
    """
    n, e = stats.requests, stats.errors
    need = max(probation.min_requests, MIN_SAMPLE)
    finished = elapsed_s >= probation.seconds
    enough = n >= probation.min_requests
    judge = n >= need or (finished and enough and n > 0)
    ratio = stats.p95_ms / baseline_p95_ms if stats.p95_ms is not None and baseline_p95_ms else None
    numbers: dict[str, float | int | None] = {
        "requests": n,
        "errors": e,
        "error_rate": stats.error_rate,
        "p95_ms": stats.p95_ms,
        "baseline_p95_ms": baseline_p95_ms,
        "p95_ratio": ratio,
        "elapsed_s": elapsed_s,
    }
    reasons: list[str] = []
    if n < need and e > probation.max_error_rate * need:
        reasons.append(
            f"{e} errors in {n} requests: the error rate would exceed {probation.max_error_rate:.2%}"
            f" even if the rest of the first {need} succeeded"
        )
    elif judge and stats.error_rate > probation.max_error_rate:
        reasons.append(f"error rate {stats.error_rate:.2%} ({e}/{n}) exceeds {probation.max_error_rate:.2%}")
    if judge and stats.p95_ms is not None:
        if probation.max_p95_ms is not None and stats.p95_ms > probation.max_p95_ms:
            reasons.append(f"p95 {stats.p95_ms:.3f} ms exceeds {probation.max_p95_ms:g} ms")
        if probation.max_p95_ratio is not None and ratio is not None and ratio > probation.max_p95_ratio:
            reasons.append(
                f"p95 {stats.p95_ms:.3f} ms is {ratio:.2f}x the baseline {baseline_p95_ms:.3f} ms"
                f" (limit {probation.max_p95_ratio:g}x)"
            )
    if reasons:
        return ProbationVerdict(ProbationOutcome.failed, tuple(reasons), numbers)
    if finished and enough:
        return ProbationVerdict(
            ProbationOutcome.passed, (f"{n} requests over {elapsed_s:.1f} s within limits",), numbers
        )
    waiting = f"elapsed {elapsed_s:.1f}/{probation.seconds:g} s, requests {n}/{probation.min_requests}"
    return ProbationVerdict(ProbationOutcome.continue_, (waiting,), numbers)
