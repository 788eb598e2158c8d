"""The device's budget of cloud calls: a thread-safe token bucket, plus a hold a cloud's
``429 Retry-After`` puts on every call until the time it names."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

#: the longest hold a Retry-After may impose (a hostile or broken cloud cannot silence it longer)
MAX_HOLD_S = 3600.0
#: the hold after a 429 that names no (readable) Retry-After
DEFAULT_HOLD_S = 1.0


class TokenBucket:
    """``per_minute`` tokens a minute, at most ``burst`` saved up; starts full.

    :meth:`try_acquire` takes a token if one is there (never waits). :meth:`hold_for` refuses every
    call until then, tokens or not (the cloud said 429)."""

    def __init__(self, per_minute: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 0 or burst < 1:
            raise ValueError("per_minute must be >= 0 and burst >= 1")
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._at = clock()
        self._held_until = float("-inf")

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def try_acquire(self) -> bool:
        """Take one token; False when none is left or a hold is on."""
        with self._lock:
            now = self._clock()
            if now < self._held_until:
                return False
            self._refill(now)
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    def held(self) -> bool:
        """Whether a Retry-After hold is on."""
        with self._lock:
            return self._clock() < self._held_until

    def hold_for(self, seconds: float) -> None:
        """No call until ``seconds`` from now (capped at :data:`MAX_HOLD_S`); a longer hold that is
        already on stays."""
        seconds = min(max(seconds, 0.0), MAX_HOLD_S)
        with self._lock:
            self._held_until = max(self._held_until, self._clock() + seconds)

    def hold_remaining(self) -> float:
        with self._lock:
            return max(self._held_until - self._clock(), 0.0)

    def tokens(self) -> float:
        with self._lock:
            self._refill(self._clock())
            return self._tokens


def parse_retry_after(value: str | None, *, now_epoch: float | None = None) -> float:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date); a missing or
    unreadable one gives :data:`DEFAULT_HOLD_S`. Bounded by 0 and :data:`MAX_HOLD_S`."""
    if value is None or not value.strip():
        return DEFAULT_HOLD_S
    text = value.strip()
    if text.isdigit():
        return min(float(text), MAX_HOLD_S)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return DEFAULT_HOLD_S
    if when.tzinfo is None:
        return DEFAULT_HOLD_S
    now = time.time() if now_epoch is None else now_epoch
    return min(max(when.timestamp() - now, 0.0), MAX_HOLD_S)
