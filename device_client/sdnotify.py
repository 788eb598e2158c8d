"""systemd's service notification protocol without a dependency: one datagram on ``$NOTIFY_SOCKET``.

:class:`Notifier` sends ``READY=1``, ``STATUS=...``, ``STOPPING=1`` (nothing when not under a
``Type=notify`` unit); :class:`Watchdog` sends ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC``
from its own thread, and only while every liveness check passes (a stuck thread stops the pings,
so systemd kills and restarts the service). Used by ``fleet device run`` and ``fleet server run``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

#: longest wait for room in the manager's queue before a notification is given up
SEND_TIMEOUT_S = 1.0
#: a liveness check: the reason it fails, or None while all is well
LivenessCheck = Callable[[], str | None]


def socket_address(value: str | None) -> str | bytes | None:
    """The address ``$NOTIFY_SOCKET`` names: a path, or ``@name`` for Linux's abstract namespace."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other forms are not used on the devices this targets


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, or None when the unit
    has no watchdog (or ``$WATCHDOG_PID`` names another process)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2_000_000


class Notifier:
    """Sends notifications to the service manager; a no-op without ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str | None = None) -> None:
        self.address = socket_address(os.environ.get("NOTIFY_SOCKET") if address is None else address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value`` lines) in one datagram; False if it could not be sent."""
        if self.address is None:
            return False
        data = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT_S)  # a full queue never blocks the watchdog's thread
                sock.sendto(data, self.address)
        except OSError as exc:
            log.warning("cannot notify the service manager: %s", exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")


class Watchdog:
    """Pings ``WATCHDOG=1`` every ``interval_s`` while every check passes.

    A failing check stops the pings (logged once per reason) so that systemd's ``WatchdogSec=``
    restarts the service; the pings resume if it passes again before that."""

    def __init__(self, notifier: Notifier, interval_s: float, checks: Mapping[str, LivenessCheck]) -> None:
        self.notifier = notifier
        self.interval_s = interval_s
        self.checks = dict(checks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-watchdog", daemon=True)
        self._failing: str | None = None

    @classmethod
    def from_env(
        cls, notifier: Notifier, checks: Mapping[str, LivenessCheck], env: Mapping[str, str] | None = None
    ) -> Watchdog | None:
        """A watchdog when the unit asks for one (``$WATCHDOG_USEC`` in ``env``, by default this
        process's environment) and can be notified."""
        interval = watchdog_interval_s(env)
        if interval is None or not notifier.enabled:
            return None
        return cls(notifier, interval, checks)

    def failure(self) -> str | None:
        """The first failing check as ``name: reason``, or None when all pass."""
        for name, check in self.checks.items():
            try:
                reason = check()
            except Exception as exc:  # a check that raises is a failing check
                reason = f"{exc.__class__.__name__}: {exc}"
            if reason is not None:
                return f"{name}: {reason}"
        return None

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """No more pings; ``wait``: until the thread has ended (at most 5 s)."""
        self._stop.set()
        if wait and self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            failure = self.failure()
            if failure is None:
                if self._failing is not None:
                    log.warning("liveness restored; watchdog pings resume")
                self._failing = None
                self.notifier.notify("WATCHDOG=1")
            elif failure != self._failing:
                self._failing = failure
                log.error("not alive (%s): watchdog pings stop", failure)
            if self._stop.wait(self.interval_s):
                return
