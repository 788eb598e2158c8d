"""What a download can fail with: ``tuf.api.exceptions.DownloadError`` subclasses throughout.

So the TUF updater handles them like its own; errors of the local file (``ENOSPC`` while writing)
stay ``OSError``.
"""

from __future__ import annotations

from tuf.api import exceptions as tuf_exc


class DeadlineExceeded(tuf_exc.SlowRetrievalError):
    """The download did not finish within its total deadline."""


class LengthMismatch(tuf_exc.DownloadLengthMismatchError):
    """The server's declared or delivered length differs from the expected one."""


class TooLarge(LengthMismatch):
    """More bytes than the cap (or the expected length) arrived or were announced."""


class HashMismatch(tuf_exc.DownloadError):
    """The complete download's SHA-256 differs from the expected one."""


#: server answers that say "try again" rather than "no": retried like a broken connection
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


class Interrupted(tuf_exc.DownloadError):
    """The connection failed (refused, reset, timed out, TLS handshake broken) or broke or stalled
    mid-body; the partial file is kept for a resume."""
