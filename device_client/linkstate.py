"""MQTT connection state and failure reasons of one paho link (the device's and the server's).

paho 2.x tells ``on_connect_fail`` that an attempt failed, not why, and a dropped connection is a
bare reason code. :class:`ReasonClient` keeps the exception of the last attempt and the socket
error paho logged; :func:`describe_error` and friends turn them into a reason label and a message
naming the certificate or address at fault; :class:`LinkState` holds the state, logs each failure
at WARNING (rate-limited while one reason repeats) and feeds health endpoints and counters.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

#: reason labels (``/metrics`` label values, ``last_error.reason`` in health documents)
REASONS = (
    "tls_verify",  # the broker's certificate did not verify (wrong CA, expired, host name)
    "tls_rejected",  # the broker refused this client's certificate (TLS alert)
    "tls",  # any other TLS failure
    "refused",  # TCP connection refused: nothing listens there
    "dns",  # the broker's host name does not resolve
    "timeout",  # no answer in time (connect, handshake or keepalive)
    "not_authorized",  # CONNACK or DISCONNECT "Not authorized" / "Bad user name or password"
    "connack",  # another CONNACK refusal
    "lost",  # an established connection dropped
    "network",  # any other socket error
)
#: a repeated failure of one reason is logged at most once per this many seconds
WARN_EVERY_S = 60.0

_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
#: TLS alerts by which a broker refuses the client's certificate
_CLIENT_CERT_ALERTS = (
    "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_REVOKED", "CERTIFICATE_EXPIRED",
    "CERTIFICATE_UNKNOWN", "CERTIFICATE_REQUIRED", "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED",
)  # fmt: skip
_NOT_AUTHORIZED = ("Not authorized", "Bad user name or password")


@dataclass(frozen=True)
class LinkFailure:
    reason: str
    message: str


@dataclass(frozen=True)
class Endpoint:
    """Where a link connects, and with what (named in failure messages)."""

    host: str
    port: int
    ca_file: str = ""
    cert_file: str = ""

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _describe_tls(code: str, text: str, ep: Endpoint) -> LinkFailure:
    if "ALERT" in code and any(alert in code for alert in _CLIENT_CERT_ALERTS):
        alert = code.split("ALERT_", 1)[1].lower().replace("_", " ")
        message = f"TLS: the broker at {ep} refused this client's certificate {ep.cert_file} ({alert})"
        return LinkFailure("tls_rejected", message)
    return LinkFailure("tls", f"TLS handshake with {ep} failed: {text}")


def describe_error(exc: BaseException, ep: Endpoint) -> LinkFailure:
    """The reason of a failed connection attempt (the exception paho's ``reconnect`` raised)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        return LinkFailure(
            "tls_verify",
            f"TLS: the broker's certificate at {ep} did not verify against CA file {ep.ca_file}: {detail}",
        )
    if isinstance(exc, ssl.SSLEOFError):
        return LinkFailure(
            "tls", f"TLS: the broker at {ep} closed the handshake without an alert (refused this client?)"
        )
    if isinstance(exc, ssl.SSLError):
        return _describe_tls(exc.reason or "", str(exc), ep)
    if isinstance(exc, socket.gaierror):
        return LinkFailure("dns", f"DNS: cannot resolve {ep.host}: {exc.strerror or exc}")
    if isinstance(exc, ConnectionRefusedError):
        return LinkFailure("refused", f"connection to {ep} refused (no broker listening there?)")
    if isinstance(exc, TimeoutError):
        return LinkFailure("timeout", f"no answer from {ep} in time")
    if isinstance(exc, OSError):
        return LinkFailure("network", f"cannot connect to {ep}: {exc.strerror or exc}")
    return LinkFailure("network", f"cannot connect to {ep}: {exc}")


def describe_socket_error(text: str, ep: Endpoint) -> LinkFailure:
    """The reason of a connection that dropped with ``text`` (the socket error paho logged)."""
    found = _SSL_REASON.search(text)
    if found is not None:
        return _describe_tls(found.group(1), text, ep)
    if text.startswith("timeout"):
        return LinkFailure("timeout", f"connection to {ep} timed out: {text}")
    return LinkFailure("lost", f"connection to {ep} lost: {text}")


def describe_connack(reason_code: object, ep: Endpoint) -> LinkFailure:
    """The reason of a CONNACK refusal."""
    reason = "not_authorized" if str(reason_code) in _NOT_AUTHORIZED else "connack"
    return LinkFailure(reason, f"the broker at {ep} refused the connection: {reason_code}")


def describe_disconnect(
    reason_code: object, from_broker: bool, socket_error: str | None, ep: Endpoint
) -> LinkFailure:
    """The reason of an unexpected disconnect (paho's ``on_disconnect``)."""
    if socket_error:
        return describe_socket_error(socket_error, ep)
    if str(reason_code) == "Keep alive timeout":
        return LinkFailure("timeout", f"no answer from {ep} within the keepalive")
    if from_broker:
        reason = "not_authorized" if str(reason_code) in _NOT_AUTHORIZED else "lost"
        return LinkFailure(reason, f"the broker at {ep} closed the connection: {reason_code}")
    return LinkFailure("lost", f"connection to {ep} lost ({reason_code})")


class WarnLimiter:
    """At most one warning per key every ``every_s`` seconds, counting those held back."""

    def __init__(self, every_s: float = WARN_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def check(self, key: str) -> tuple[bool, int]:
        """(log this one?, how many of ``key`` were held back since the last one logged)."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._held[key] += 1
            return False, 0
        self._last[key] = now
        return True, self._held.pop(key, 0)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class LinkState:
    """Thread-safe state of one MQTT link: ``connecting``, ``connected``, ``disconnected``
    (reconnecting) or ``stopped``; the last failure; failures counted per reason."""

    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        *,
        logger: logging.Logger = log,
        limiter: WarnLimiter | None = None,
        on_failure: Callable[[LinkFailure], None] | None = None,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.logger = logger
        self.limiter = limiter or WarnLimiter()
        self.on_failure = on_failure
        self.on_change = on_change
        self._lock = threading.Lock()
        self._state = "connecting"
        self._since = time.time()
        self._last: LinkFailure | None = None
        self._last_at = 0.0
        self._failures: Counter[str] = Counter()
        self._streak = 0  # failures since the last successful connect
        self._attempt_failed = False

    @property
    def state(self) -> str:
        return self._state

    def attempt(self) -> None:
        """A connection attempt begins."""
        with self._lock:
            self._attempt_failed = False

    def connected(self) -> None:
        with self._lock:
            streak, self._streak = self._streak, 0
            last = self._last
            self._attempt_failed = False
        if streak and last is not None:
            self.logger.info(
                "MQTT %s: connected to %s after %d failed attempt(s) (last: %s)",
                self.name, self.endpoint, streak, last.reason,
            )  # fmt: skip
        self._set("connected")

    def failed(self, failure: LinkFailure) -> None:
        """A connection attempt failed or a connection dropped: count, log (rate-limited), show."""
        with self._lock:
            self._attempt_failed = True
            self._failures[failure.reason] += 1
            self._streak += 1
            changed = failure != self._last
            self._last, self._last_at = failure, time.time()
            log_now, held = self.limiter.check(failure.reason)
        if log_now:
            more = f" ({held} more since the last warning)" if held else ""
            self.logger.warning(
                "MQTT %s: %s [%s]; retrying%s", self.name, failure.message, failure.reason, more
            )
        if self.on_failure is not None:
            self.on_failure(failure)
        self._set("disconnected", force_notify=changed)

    def closed(self, failure: LinkFailure) -> None:
        """The connection closed unexpectedly: a failure, unless this attempt was already
        reported as one (a refused CONNACK is followed by a disconnect)."""
        with self._lock:
            reported = self._attempt_failed
        if not reported:
            self.failed(failure)

    def stopped(self) -> None:
        self._set("stopped")

    def _set(self, state: str, force_notify: bool = False) -> None:
        with self._lock:
            changed = state != self._state
            if changed:
                self._state, self._since = state, time.time()
        if (changed or force_notify) and self.on_change is not None:
            try:
                self.on_change(self.snapshot())
            except Exception:
                self.logger.exception("MQTT %s: recording the link state failed", self.name)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            last = self._last
            return {
                "state": self._state,
                "connected": self._state == "connected",
                "broker": str(self.endpoint),
                "since": _iso(self._since),
                "last_error": None
                if last is None
                else {"reason": last.reason, "message": last.message, "at": _iso(self._last_at)},
                "failures": dict(self._failures),
            }


class _ErrorTap(logging.Logger):
    """The logger paho gets (``enable_logger``): only its ERROR records pass the level check, so
    paho's per-packet DEBUG messages cost nothing. A socket error is kept for the disconnect that
    follows; an exception in one of our callbacks is logged."""

    def __init__(self, client: ReasonClient) -> None:
        super().__init__("paho", logging.ERROR)
        self.propagate = False
        self._client = client

    def handle(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("Caught exception"):
            log.error("paho: %s", text)
        else:
            self._client.socket_error = text


class ReasonClient(mqtt.Client):
    """A paho client that keeps why it failed: ``connect_error``, the exception of the last
    connection attempt (``reconnect`` raised it; paho's ``on_connect_fail`` does not get it), and
    ``socket_error``, the socket error paho logged before a connection dropped."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connect_error: BaseException | None = None
        self.socket_error: str | None = None
        self.enable_logger(_ErrorTap(self))

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self.connect_error = None
        self.socket_error = None
        try:
            return super().reconnect()
        except OSError as exc:
            self.connect_error = exc
            raise
