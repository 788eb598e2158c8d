"""Who is calling the cloud tier (:class:`CallerAuth`): an enrolled device, by its fleet certificate
(mTLS) or its device token, checked against the server's database. Unknown callers get 401,
decommissioned devices or revoked certificates 403, a database that cannot be reached 503."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography import x509
from cryptography.x509.oid import NameOID

from server import errors as server_errors
from server.cloud.errors import Forbidden, OipError, Unauthorized, Unavailable
from server.db import Database
from server.devices.repository import DeviceRepository, RevocationRepository
from server.devices.tables import DeviceStatus
from server.security import DEVICE_PREFIX, authenticate_token
from server.trust.pki import serial_hex

MAX_CACHED = 50_000


@dataclass(frozen=True)
class Caller:
    device_id: str
    #: ``certificate`` or ``token``
    via: str


class CallerAuth:
    """Authenticates callers against the device registry; thread-safe.

    * **Certificate**: the TLS handshake has verified it against the fleet CA; its CN must name an
      enrolled device whose current certificate it is (same serial), not on the CRL (the
      revocations the server issues its CRL from) and not decommissioned.
    * **Token** (``Authorization: Bearer fd.<device_id>.<secret>``): the secret must match the hash
      the server stored at enrollment, and the device must not be decommissioned.

    Verdicts are reused for ``cache_s`` seconds (a bounded LRU), so the database sees at most one
    query per caller per period; a decommission takes effect within that period."""

    def __init__(
        self,
        db: Database,
        *,
        cache_s: float = 5.0,
        max_cached: int = MAX_CACHED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.cache_s = cache_s
        self.max_cached = max_cached
        self.clock = clock
        #: key -> (valid until, the caller or the refusal's class and message)
        self._cache: OrderedDict[str, tuple[float, Caller | tuple[type[OipError], str]]] = OrderedDict()
        self._lock = threading.Lock()

    def by_token(self, bearer: str) -> Caller:
        key = "t:" + hashlib.sha256(bearer.encode("utf-8", "surrogatepass")).hexdigest()
        return self._cached(key, lambda: self._check_token(bearer))

    def by_certificate(self, der: bytes) -> Caller:
        key = "c:" + hashlib.sha256(der).hexdigest()
        return self._cached(key, lambda: self._check_certificate(der))

    # ---------------------------------------------------------------- checks

    def _check_token(self, bearer: str) -> Caller:
        with self.db.session_scope() as session:
            devices = DeviceRepository(session)
            try:
                device = authenticate_token(
                    bearer, DEVICE_PREFIX, "device", devices.get, lambda d: d.token_hash
                )
            except server_errors.Unauthorized as exc:
                raise Unauthorized(f"{exc}: a device token (or certificate) is required") from None
            if device.status == DeviceStatus.decommissioned:
                raise Forbidden(f"device {device.id!r} is decommissioned")
            return Caller(device.id, "token")

    def _check_certificate(self, der: bytes) -> Caller:
        try:
            cert = x509.load_der_x509_certificate(der)
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError:
            raise Unauthorized("unreadable client certificate") from None
        if len(names) != 1 or not isinstance(names[0].value, str):
            raise Unauthorized("the client certificate must name exactly one device (CN)")
        device_id, serial = names[0].value, serial_hex(cert)
        with self.db.session_scope() as session:
            device = DeviceRepository(session).get(device_id)
            if device is None:
                raise Unauthorized(f"certificate of unknown device {device_id!r}")
            if RevocationRepository(session).is_revoked(serial):
                raise Forbidden(f"the certificate of {device_id!r} is revoked")
            if device.cert_serial != serial:
                raise Unauthorized(f"the certificate is not the current one of {device_id!r}")
            if device.status == DeviceStatus.decommissioned:
                raise Forbidden(f"device {device_id!r} is decommissioned")
            return Caller(device_id, "certificate")

    # ---------------------------------------------------------------- cache

    def _cached(self, key: str, check: Callable[[], Caller]) -> Caller:
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(key)
                verdict = hit[1]
                if isinstance(verdict, Caller):
                    return verdict
                cls, message = verdict
                raise cls(message)  # a new exception each time (a re-raised one grows its traceback)
        try:
            verdict = check()
        except OipError as exc:
            self._remember(key, now, (type(exc), exc.message))
            raise
        except sa.exc.SQLAlchemyError as exc:  # not cached: the next request asks again
            raise Unavailable(f"the device registry cannot be reached: {exc.__class__.__name__}") from None
        self._remember(key, now, verdict)
        return verdict

    def _remember(self, key: str, now: float, verdict: Caller | tuple[type[OipError], str]) -> None:
        if self.cache_s <= 0:
            return
        with self._lock:
            self._cache[key] = (now + self.cache_s, verdict)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
