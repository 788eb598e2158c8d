"""Bounded downloads: a ``tuf.ngclient`` fetcher over httpx (:mod:`.tuf_fetcher`) and a resumable
bundle download (:mod:`.resumable`, hashed and written by :mod:`.pipeline`).

Both carry the device token and certificates of :class:`HttpSettings`, stream the body, cap its
size and keep a hard total deadline (:class:`~.settings.Deadline`). Every error is a
``tuf.api.exceptions.DownloadError`` (:mod:`.errors`), except ``OSError`` from the local file.
"""

from .errors import (
    TRANSIENT_STATUSES,
    DeadlineExceeded,
    HashMismatch,
    Interrupted,
    LengthMismatch,
    TooLarge,
)
from .resumable import DEFAULT_READ_BYTES, download_resumable
from .settings import HttpSettings, url_origin
from .tuf_fetcher import HttpxFetcher

__all__ = [
    "DEFAULT_READ_BYTES",
    "TRANSIENT_STATUSES",
    "DeadlineExceeded",
    "HashMismatch",
    "HttpSettings",
    "HttpxFetcher",
    "Interrupted",
    "LengthMismatch",
    "TooLarge",
    "download_resumable",
    "url_origin",
]
