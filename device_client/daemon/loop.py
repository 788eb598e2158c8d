"""One background thread that repeats a step until the daemon stops (:class:`BackgroundLoop`): the
worker and the health publisher both run on one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class BackgroundLoop:
    """Calls ``step`` on a daemon thread named ``name`` until ``stop`` is set.

    Before every step it waits up to ``interval_s`` for ``stop`` (0: not at all). No exception ends
    the loop: a step that raises is logged as ``failure`` with its traceback, then the loop pauses
    ``error_pause_s`` (a step that keeps failing does not spin)."""

    def __init__(
        self,
        name: str,
        step: Callable[[], None],
        stop: threading.Event,
        *,
        failure: str,
        interval_s: float = 0.0,
        error_pause_s: float = 0.0,
    ) -> None:
        self.step = step
        self.stop = stop
        self.failure = failure
        self.interval_s = interval_s
        self.error_pause_s = error_pause_s
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        #: ``time.monotonic()`` when the step in progress began; None between steps
        self.step_started: float | None = None

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

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
        while not self.stop.wait(self.interval_s):
            self.step_started = time.monotonic()
            try:
                self.step()
            except Exception:
                log.exception(self.failure)
                if self.error_pause_s > 0:
                    self.stop.wait(self.error_pause_s)
            finally:
                self.step_started = None
