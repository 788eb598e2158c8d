"""Bounded downloads: a ``tuf.ngclient`` fetcher over httpx and a resumable bundle download.

Both send ``Authorization: Bearer <device token>`` when a token is configured (and present the
device's client certificate when one is), stream the body, cap its size, and enforce a hard *total*
deadline: a server that drips a byte now and then cannot hold a download open beyond it.

Deadline bound. The deadline is checked after every received chunk, and every socket read waits at
most ``min(read_timeout_s, time left)``; so a download ends, at worst, one read after the deadline,
i.e. within ``deadline_s + min(read_timeout_s, deadline_s)`` even when the peer stops sending.

:func:`download_resumable` keeps its progress only in the ``.partial`` file: it re-hashes the
existing prefix, asks for the rest with ``Range: bytes=N-``, and copes with a ``206`` (append), a
``200`` (the server ignored the range: start over), and a ``416`` (the partial file does not fit the
server's file: start over). On success the file is fsynced and renamed to its final name. A hash
mismatch deletes the partial file (its bytes are poisoned); an interruption keeps it for the next
attempt.

All errors are ``tuf.api.exceptions.DownloadError`` subclasses, so the TUF updater handles them too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface

from .config import DeviceSettings

log = logging.getLogger(__name__)

_FSYNC_EVERY = 16 * 1024 * 1024
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


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
    """The connection broke or stalled mid-body; the partial file is kept for a resume."""


@dataclass(frozen=True)
class HttpSettings:
    """How the device talks HTTP(S) to the server's repository and artifact endpoints."""

    token: str | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_cert: Path | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    user_agent: str = "fleetota-device"

    @classmethod
    def from_device_settings(cls, s: DeviceSettings) -> HttpSettings:
        return cls(
            token=s.device_token.get_secret_value() if s.device_token else None,
            client_cert=s.client_cert,
            client_key=s.client_key,
            ca_cert=s.ca_cert,
            connect_timeout_s=s.download_connect_timeout_s,
            read_timeout_s=s.download_read_timeout_s,
        )

    def headers(self) -> dict[str, str]:
        h = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def client(self) -> httpx.Client:
        verify: ssl.SSLContext | bool = True
        if self.ca_cert is not None or self.client_cert is not None:
            ctx = ssl.create_default_context(cafile=str(self.ca_cert) if self.ca_cert else None)
            if self.client_cert is not None and self.client_key is not None:
                ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
            verify = ctx
        return httpx.Client(verify=verify, headers=self.headers(), follow_redirects=False, trust_env=False)


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self, url: str) -> None:
        if self.remaining() <= 0:
            raise DeadlineExceeded(f"download of {url} exceeded its {self.seconds:g} s deadline")

    def timeout(self, http: HttpSettings) -> httpx.Timeout:
        left = max(self.remaining(), 0.001)
        return httpx.Timeout(
            connect=min(http.connect_timeout_s, left),
            read=min(http.read_timeout_s, left),
            write=min(http.read_timeout_s, left),
            pool=min(http.connect_timeout_s, left),
        )


def _send(
    client: httpx.Client, url: str, headers: Mapping[str, str], deadline: _Deadline, http: HttpSettings
) -> httpx.Response:
    deadline.check(url)
    request = client.build_request("GET", url, headers=dict(headers), timeout=deadline.timeout(http))
    try:
        return client.send(request, stream=True)
    except httpx.TimeoutException as exc:
        deadline.check(url)
        raise tuf_exc.SlowRetrievalError(f"{url}: {exc.__class__.__name__}") from exc
    except httpx.HTTPError as exc:
        raise tuf_exc.DownloadError(f"{url}: {exc.__class__.__name__}: {exc}") from exc


def _stream(response: httpx.Response, url: str, deadline: _Deadline) -> Iterator[bytes]:
    """The body as it arrives; closes the response; maps transport errors."""
    try:
        for chunk in response.iter_raw():
            deadline.check(url)
            if chunk:
                yield chunk
        deadline.check(url)
    except httpx.TimeoutException as exc:
        deadline.check(url)
        raise Interrupted(f"{url}: stalled ({exc.__class__.__name__})") from exc
    except httpx.HTTPError as exc:
        raise Interrupted(f"{url}: connection broke: {exc}") from exc
    finally:
        response.close()


class HttpxFetcher(FetcherInterface):
    """``tuf.ngclient`` fetcher: bearer token / client cert, size cap, hard total deadline per URL.

    ``max_bytes`` caps every response on top of the ``max_length`` that ngclient enforces.
    """

    def __init__(
        self,
        http: HttpSettings | None = None,
        *,
        deadline_s: float = 60.0,
        max_bytes: int = 16 * 1024 * 1024,
        client: httpx.Client | None = None,
    ) -> None:
        self.http = http or HttpSettings()
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes
        self._client = client or self.http.client()

    def close(self) -> None:
        self._client.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        deadline = _Deadline(self.deadline_s)
        response = _send(self._client, url, self.http.headers(), deadline, self.http)
        if response.status_code >= 400:
            response.close()
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {response.status_code}", response.status_code)
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response.close()
            raise TooLarge(f"{url}: announces {declared} bytes, cap is {self.max_bytes}")
        return self._capped(response, url, deadline)

    def _capped(self, response: httpx.Response, url: str, deadline: _Deadline) -> Iterator[bytes]:
        received = 0
        for chunk in _stream(response, url, deadline):
            received += len(chunk)
            if received > self.max_bytes:
                response.close()
                raise TooLarge(f"{url}: more than {self.max_bytes} bytes")
            yield chunk


def _hash_prefix(path: Path, length: int) -> hashlib._Hash:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        remaining = length
        while remaining > 0:
            block = fh.read(min(1024 * 1024, remaining))
            if not block:
                break
            h.update(block)
            remaining -= len(block)
    return h


def _final_name(dest_partial: Path) -> Path:
    if dest_partial.suffix == ".partial":
        return dest_partial.with_suffix("")
    return dest_partial.with_name(dest_partial.name + ".done")


def _finish(partial: Path, final: Path) -> Path:
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def download_resumable(
    url: str,
    dest_partial: Path,
    *,
    expected_length: int,
    expected_sha256: str,
    max_bytes: int,
    deadline_s: float,
    http: HttpSettings | None = None,
    client: httpx.Client | None = None,
    attempts: int = 1,
    final_path: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Download ``url`` into ``dest_partial`` (resuming it), verify, and rename to the final path.

    The final path is ``final_path`` or ``dest_partial`` without its ``.partial`` suffix. Up to
    ``attempts`` passes are made when the connection breaks or stalls, all within ``deadline_s``.
    ``on_progress(received, expected_length)`` is called after every chunk.
    """
    http = http or HttpSettings()
    expected_sha256 = expected_sha256.lower()
    final = final_path or _final_name(dest_partial)
    if expected_length > max_bytes:
        raise TooLarge(f"{url}: {expected_length} bytes exceeds the cap of {max_bytes}")
    deadline = _Deadline(deadline_s)
    own_client = client is None
    cl = client or http.client()
    try:
        for attempt in range(1, attempts + 1):
            try:
                _one_pass(
                    url, dest_partial, expected_length, expected_sha256, deadline, http, cl, on_progress
                )
                return _finish(dest_partial, final)
            except Interrupted as exc:
                if attempt == attempts:
                    raise
                deadline.check(url)
                log.info("download of %s interrupted (%s); resuming (attempt %d)", url, exc, attempt + 1)
                time.sleep(min(0.1 * 2**attempt, max(deadline.remaining(), 0)))
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        if own_client:
            cl.close()


def _one_pass(
    url: str,
    partial: Path,
    expected_length: int,
    expected_sha256: str,
    deadline: _Deadline,
    http: HttpSettings,
    client: httpx.Client,
    on_progress: Callable[[int, int], None] | None,
) -> None:
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > expected_length:
        have = 0
    if have == expected_length:
        if _hash_prefix(partial, have).hexdigest() == expected_sha256:
            return
        have = 0  # complete but wrong: start over
    allow_range = True
    for _ in range(2):  # a second round only after a 416 / unusable 206
        start = have if allow_range else 0
        headers = http.headers()
        if start > 0:
            headers["Range"] = f"bytes={start}-"
        response = _send(client, url, headers, deadline, http)
        status = response.status_code
        if status == 416:
            response.close()
            log.info("%s: range %d- not satisfiable; restarting from zero", url, start)
            allow_range = False
            continue
        if status in TRANSIENT_STATUSES:
            response.close()
            raise Interrupted(f"{url}: HTTP {status} (transient; retried within the deadline)")
        if status >= 400:
            response.close()
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {status}", status)
        if status == 206:
            m = _CONTENT_RANGE_RE.match(response.headers.get("content-range", ""))
            if m is None or int(m.group(1)) != start:
                response.close()
                allow_range = False
                continue
            if m.group(3) != "*" and int(m.group(3)) != expected_length:
                response.close()
                raise _length_error(url, int(m.group(3)), expected_length)
        elif status == 200:
            start = 0
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) != expected_length:
                response.close()
                raise _length_error(url, int(declared), expected_length)
        else:
            response.close()
            raise tuf_exc.DownloadHTTPError(f"{url}: unexpected HTTP {status}", status)
        _receive(response, url, partial, start, expected_length, expected_sha256, deadline, on_progress)
        return
    raise tuf_exc.DownloadError(f"{url}: server refused every range request")


def _length_error(url: str, got: int, expected: int) -> LengthMismatch:
    cls = TooLarge if got > expected else LengthMismatch
    return cls(f"{url}: server has {got} bytes, expected {expected}")


def _receive(
    response: httpx.Response,
    url: str,
    partial: Path,
    start: int,
    expected_length: int,
    expected_sha256: str,
    deadline: _Deadline,
    on_progress: Callable[[int, int], None] | None,
) -> None:
    h = _hash_prefix(partial, start) if start > 0 else hashlib.sha256()
    received = start
    since_sync = 0
    mode = "r+b" if partial.exists() else "wb"
    with open(partial, mode) as fh:
        fh.seek(start)
        fh.truncate()
        try:
            for chunk in _stream(response, url, deadline):
                received += len(chunk)
                if received > expected_length:
                    fh.close()
                    partial.unlink(missing_ok=True)
                    raise TooLarge(f"{url}: more than the expected {expected_length} bytes")
                fh.write(chunk)
                h.update(chunk)
                since_sync += len(chunk)
                if since_sync >= _FSYNC_EVERY:
                    fh.flush()
                    os.fsync(fh.fileno())
                    since_sync = 0
                if on_progress is not None:
                    on_progress(received, expected_length)
        finally:
            if not fh.closed:
                fh.flush()
    if received < expected_length:
        raise Interrupted(f"{url}: connection ended after {received} of {expected_length} bytes")
    if h.hexdigest() != expected_sha256:
        partial.unlink(missing_ok=True)
        raise HashMismatch(f"{url}: sha256 {h.hexdigest()} differs from the expected {expected_sha256}")
