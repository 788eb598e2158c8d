"""A small thread pool with a bounded queue for work off the caller's path (audits, cache writes):
:meth:`BoundedExecutor.submit` never blocks and says False when the queue is full (the caller
counts the drop)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)


class BoundedExecutor:
    """``workers`` threads; at most ``capacity`` jobs queued or running at once."""

    def __init__(self, workers: int, capacity: int, name: str) -> None:
        if workers < 1 or capacity < 1:
            raise ValueError("workers and capacity must be >= 1")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(capacity)
        self._idle = threading.Condition()
        self._pending = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Queue ``fn(*args)``; False (and nothing queued) when full or closed."""
        if not self._slots.acquire(blocking=False):
            return False
        with self._idle:
            self._pending += 1
        try:
            self._pool.submit(self._run, fn, args)
        except RuntimeError:  # shut down
            self._release()
            return False
        return True

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("background routing job failed")
        finally:
            self._release()

    def _release(self) -> None:
        self._slots.release()
        with self._idle:
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job is queued or running; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Stop taking jobs; queued ones are dropped, running ones finish on their own."""
        self._pool.shutdown(wait=False, cancel_futures=True)
