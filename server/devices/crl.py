"""The CRL served at ``GET /api/v1/pki/crl.pem``: the broker's ``crl.pem``, never signed per request.

:func:`~server.devices.service.refresh_broker_crl` writes that file at start-up, on every
decommission and on the refresh job's schedule; :class:`PublishedCrl` reads and checks it once per
change of the file and answers with an ``ETag``, a ``Last-Modified`` (the CRL's lastUpdate) and
conditional GETs (304).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import TYPE_CHECKING

from server.devices.service import CRL_FILE, refresh_broker_crl

if TYPE_CHECKING:
    from server.context import ServerContext

#: how long a client or cache may reuse the CRL without asking again (a decommission shows after
#: at most this long; with the ETag a revalidation costs a 304)
CRL_MAX_AGE_S = 60


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
