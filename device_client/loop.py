"""One background thread that repeats a step until it is told to stop (:class:`BackgroundLoop`).

The daemon's worker and health publisher run on one each, and so do the server's rollout engine,
health rollup, MQTT ingest worker and outbox publisher. Standard library only: any install has it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class BackgroundLoop:
    """Calls ``step`` on a daemon thread named ``name`` until ``stop`` is set.

    Before every step it waits up to ``interval_s`` for ``stop`` (0: not at all; a callable is asked
    before each wait). No exception ends the loop: a step that raises is logged as ``failure`` with
    its traceback (on ``logger``, by default this module's), then the loop pauses ``error_pause_s``
    (a step that keeps failing does not spin)."""

    def __init__(
        self,
        name: str,
        step: Callable[[], object],
        stop: threading.Event,
        *,
        failure: str,
        interval_s: float | Callable[[], float] = 0.0,
        error_pause_s: float = 0.0,
        logger: logging.Logger = log,
    ) -> None:
        self.step = step
        self.stop = stop
        self.failure = failure
        self.interval_s = interval_s
        self.error_pause_s = error_pause_s
        self.log = logger
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        #: ``time.monotonic()`` when the step in progress began; None between steps
        self.step_started: float | None = None

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (after ``stop`` is set); at once if it never started."""
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _interval(self) -> float:
        return self.interval_s() if callable(self.interval_s) else self.interval_s

    def stalled(self, limit_s: float) -> str | None:
        """Why this loop is not making progress (its thread ended, or one step has run longer than
        ``limit_s``), or None while it is."""
        if not self._thread.is_alive():
            return "its thread ended"
        started = self.step_started
        if started is not None and time.monotonic() - started > limit_s:
            return f"one step has run for more than {limit_s:g} s"
        return None

    def _run(self) -> None:
        while not self.stop.wait(self._interval()):
            self.step_started = time.monotonic()
            try:
                self.step()
            except Exception:
                self.log.exception(self.failure)
                if self.error_pause_s > 0:
                    self.stop.wait(self.error_pause_s)
            finally:
                self.step_started = None
