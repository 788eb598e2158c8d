"""The broker's CRL (``broker_dir/crl.pem``), also served at ``GET /api/v1/pki/crl.pem``, never
signed per request.

:func:`refresh_broker_crl` writes that file from the database's revocations at start-up, on every
decommission and on the refresh job's schedule; :class:`PublishedCrl` reads and checks it once per
change of the file and answers with an ``ETag``, a ``Last-Modified`` (the CRL's lastUpdate) and
conditional GETs (304).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from typing import TYPE_CHECKING

from server.devices.repository import RevocationRepository
from server.trust.pki import CRL_VALIDITY

if TYPE_CHECKING:
    from server.context import ServerContext

log = logging.getLogger(__name__)

CRL_FILE = "crl.pem"
#: how long a client or cache may reuse the CRL without asking again (a decommission shows after
#: at most this long; with the ETag a revalidation costs a 304)
CRL_MAX_AGE_S = 60
#: one CRL writer at a time in this process: each reads the committed revocations and writes them,
#: so a periodic refresh that read before a decommission committed cannot overwrite its CRL
_CRL_LOCK = threading.Lock()


@dataclass(frozen=True)
class CrlWrite:
    """A CRL (re)written into ``broker_dir``: why, how many serials, how many brokers reloaded."""

    reason: str
    revoked: int
    reloaded: int


def refresh_broker_crl(
    ctx: ServerContext,
    *,
    force: bool = False,
    validity: timedelta = CRL_VALIDITY,
    now: datetime | None = None,
) -> CrlWrite | None:
    """Rebuild the broker's CRL (``broker_dir/crl.pem``) from the database's revocations when it
    is missing, not signed by the fleet CA, lists other serials, or has less than half of its
    validity left (``force``: always), and make a local broker running the generated config
    re-read it (``ctx.broker``: SIGHUP, :mod:`server.mqtt.reload`). None if the file was current.

    Run at server start-up and by the periodic refresh job: a CRL past its ``nextUpdate`` makes
    OpenSSL refuse every handshake to the broker ("CRL has expired"), the server's own included."""
    path = ctx.settings.broker_dir / CRL_FILE
    with _CRL_LOCK:
        with ctx.db.session_scope() as session:
            revoked = RevocationRepository(session).all()
        reason = "forced" if force else ctx.ca.crl_refresh_reason(path, revoked, now=now)
        if reason is None:
            return None
        ctx.ca.write_crl(path, revoked, validity, now=now)
        reloaded = ctx.broker.reload_crl()
    log.info(
        "wrote the broker CRL %s (%s): %d revoked serials; %s",
        path, reason, len(revoked),
        f"{reloaded} local broker(s) reloaded" if reloaded else "no local broker runs it: reload the broker",
    )  # fmt: skip
    return CrlWrite(reason=reason, revoked=len(revoked), reloaded=reloaded)


@dataclass(frozen=True)
class CrlDocument:
    """One issued CRL as served."""

    pem: bytes
    etag: str
    last_modified: datetime
    next_update: datetime | None

    def headers(self) -> dict[str, str]:
        return {
            "ETag": self.etag,
            "Last-Modified": format_datetime(self.last_modified.astimezone(UTC), usegmt=True),
            "Cache-Control": f"public, max-age={CRL_MAX_AGE_S}",
        }

    def not_modified(self, if_none_match: str | None, if_modified_since: str | None) -> bool:
        """Whether a conditional GET may be answered 304 (RFC 9110 13.1: If-None-Match, weakly
        compared, takes precedence over If-Modified-Since)."""
        if if_none_match is not None:
            tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
            return "*" in tags or self.etag in tags
        if if_modified_since is None:
            return False
        try:
            since = parsedate_to_datetime(if_modified_since)
        except (TypeError, ValueError):
            return False
        if since.tzinfo is None:
            return False
        return self.last_modified.replace(microsecond=0) <= since


class PublishedCrl:
    """``broker_dir/crl.pem``, re-read only when the file changes (it is replaced atomically)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.path = ctx.settings.broker_dir / CRL_FILE
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._doc: CrlDocument | None = None

    def current(self, now: datetime | None = None) -> CrlDocument | None:
        """The CRL to serve; a missing, foreign or expired file is re-issued from the database
        first (as the refresh job would). None if even that leaves no valid CRL."""
        now = now or datetime.now(UTC)
        doc = self._read()
        if doc is None or (doc.next_update is not None and doc.next_update <= now):
            refresh_broker_crl(self.ctx, now=now)
            doc = self._read()
        return doc

    def _read(self) -> CrlDocument | None:
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
                with self._lock:
                    if key == self._key:
                        return self._doc
                pem = fh.read()
        except OSError:
            return None
        crl = self.ctx.ca.parse_crl(pem)
        if crl is None:
            return None
        doc = CrlDocument(
            pem=pem,
            etag=f'"{hashlib.sha256(pem).hexdigest()[:32]}"',
            last_modified=crl.last_update_utc,
            next_update=crl.next_update_utc,
        )
        with self._lock:
            self._key, self._doc = key, doc
        return doc
