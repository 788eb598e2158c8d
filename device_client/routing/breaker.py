"""A circuit breaker for the cloud: closed -> open after ``failures`` consecutive failures ->
half-open after ``open_s`` (up to ``probes`` trial calls at a time) -> closed on a success, open
again on a failure. Thread-safe, with an injectable clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


class CircuitBreaker:
    """Every call :meth:`allow` admits must end in exactly one of :meth:`record_success`,
    :meth:`record_failure` or :meth:`record_neutral` (a call that says nothing about the cloud's
    health, e.g. a 429: it only frees its half-open trial slot)."""

    def __init__(
        self, failures: int, open_s: float, probes: int = 1, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if failures < 1 or open_s < 0 or probes < 1:
            raise ValueError("failures and probes must be >= 1, open_s >= 0")
        self.failures = failures
        self.open_s = open_s
        self.probes = probes
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.closed
        self._consecutive = 0
        self._opened_at = 0.0
        self._trials = 0  # trial calls in flight while half-open
        self.opened = 0  # times it opened (for the record)

    def _current(self) -> BreakerState:
        if self._state is BreakerState.open and self._clock() - self._opened_at >= self.open_s:
            self._state = BreakerState.half_open
            self._trials = 0
        return self._state

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._current()

    def allow(self) -> bool:
        """Whether a call may go to the cloud now (half-open: one of the ``probes`` trials)."""
        with self._lock:
            state = self._current()
            if state is BreakerState.closed:
                return True
            if state is BreakerState.half_open and self._trials < self.probes:
                self._trials += 1
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            state = self._current()
            if state is BreakerState.half_open:
                self._state = BreakerState.closed
                self._trials = 0
            if state is not BreakerState.open:  # a late answer to a call made before it opened
                self._consecutive = 0

    def record_failure(self) -> None:
        with self._lock:
            state = self._current()
            if state is BreakerState.half_open:
                self._open()
            elif state is BreakerState.closed:
                self._consecutive += 1
                if self._consecutive >= self.failures:
                    self._open()

    def record_neutral(self) -> None:
        with self._lock:
            if self._current() is BreakerState.half_open and self._trials > 0:
                self._trials -= 1

    def _open(self) -> None:
        self._state = BreakerState.open
        self._opened_at = self._clock()
        self._consecutive = 0
        self._trials = 0
        self.opened += 1
