"""The resumable bundle download (:func:`download_resumable`): Range requests over ``http.client``,
a size cap, a total deadline, and SHA-256 while streaming; progress lives only in the ``.partial``
file, so an interrupted download resumes where it stopped."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException, HTTPResponse, HTTPSConnection
from pathlib import Path
from urllib.parse import urlsplit

from tuf.api import exceptions as tuf_exc

from ..protocol.fsutil import fsync_dir
from .errors import TRANSIENT_STATUSES, HashMismatch, Interrupted, LengthMismatch, TooLarge
from .pipeline import HashWriter, hash_prefix
from .settings import Deadline, HttpSettings

log = logging.getLogger(__name__)

#: the most one socket read of a bundle download takes (DeviceSettings.download_chunk_bytes)
DEFAULT_READ_BYTES = 256 * 1024
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def _final_name(dest_partial: Path) -> Path:
    if dest_partial.suffix == ".partial":
        return dest_partial.with_suffix("")
    return dest_partial.with_name(dest_partial.name + ".done")


def _finish(partial: Path, final: Path) -> Path:
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, final)
    fsync_dir(final.parent)
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
    attempts: int = 1,
    final_path: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_response: Callable[[int, Mapping[str, str]], None] | None = None,
    read_bytes: int = DEFAULT_READ_BYTES,
) -> Path:
    """Download ``url`` into ``dest_partial`` (resuming it), verify, and rename to the final path.

    The final path is ``final_path`` or ``dest_partial`` without its ``.partial`` suffix. Up to
    ``attempts`` passes are made when the connection fails, breaks or stalls, all within ``deadline_s``.
    ``on_response(status, headers)`` sees every response (header names in lower case);
    ``on_progress(received, expected_length)`` is called after every socket read, which takes at
    most ``read_bytes``. Both run on the calling thread and may raise to abandon the download (the
    partial file keeps what arrived).

    Resume: the existing prefix is re-hashed and the rest asked for with ``Range: bytes=N-``; a
    ``206`` appends, a ``200`` (the server ignored the range) and a ``416`` (the partial file does
    not fit the server's file) start over. On success the file is fsynced and renamed to its final
    name. A hash mismatch deletes the partial file (its bytes are poisoned); an interruption keeps
    it for the next attempt.

    Throughput: bundles are large, and httpx reads the socket 64 KB at a time through several
    Python layers, which alone held it to about a third of ``openssl dgst -sha256``. So this speaks
    HTTP/1.1 with ``http.client`` (one connection per request, the same TLS settings) and reads the
    socket straight into the blocks of a :class:`~.pipeline.HashWriter` (``readinto``, up to
    ``read_bytes`` per read), whose threads hash and write while the next bytes arrive. Every byte
    received is written (in order) before the call returns or raises, so an interruption keeps all
    of it for the resume.
    """
    http = http or HttpSettings()
    expected_sha256 = expected_sha256.lower()
    final = final_path or _final_name(dest_partial)
    if expected_length > max_bytes:
        raise TooLarge(f"{url}: {expected_length} bytes exceeds the cap of {max_bytes}")
    deadline = Deadline(deadline_s)
    ssl_context = http.ssl_context(url) if urlsplit(url).scheme == "https" else None
    io = _PassIO(url, deadline, http, ssl_context, on_response, on_progress, max(read_bytes, 1))
    for attempt in range(1, attempts + 1):
        try:
            _one_pass(io, dest_partial, expected_length, expected_sha256)
            return _finish(dest_partial, final)
        except Interrupted as exc:
            if attempt == attempts:
                raise
            deadline.check(url)
            log.info("download of %s interrupted (%s); resuming (attempt %d)", url, exc, attempt + 1)
            time.sleep(min(0.1 * 2**attempt, max(deadline.remaining(), 0)))
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class _PassIO:
    """What every pass of one :func:`download_resumable` call shares."""

    url: str
    deadline: Deadline
    http: HttpSettings
    ssl_context: ssl.SSLContext | None
    on_response: Callable[[int, Mapping[str, str]], None] | None
    on_progress: Callable[[int, int], None] | None
    read_bytes: int


@dataclass
class _Reply:
    conn: HTTPConnection
    #: the connection's socket (http.client lets go of it once a response says "close")
    sock: socket.socket
    response: HTTPResponse
    status: int
    #: lower-case names
    headers: dict[str, str]

    def close(self) -> None:
        self.response.close()
        self.conn.close()


def _request(io: _PassIO, headers: Mapping[str, str]) -> _Reply:
    """GET ``io.url`` on a connection of its own; the status and headers are read, the body not."""
    url, deadline, http = io.url, io.deadline, io.http
    deadline.check(url)
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL")
        connect_s = min(http.connect_timeout_s, max(deadline.remaining(), 0.001))
        if parts.scheme == "https":
            conn: HTTPConnection = HTTPSConnection(
                parts.hostname, parts.port, timeout=connect_s, context=io.ssl_context
            )
        else:
            conn = HTTPConnection(parts.hostname, parts.port, timeout=connect_s)
    except ValueError as exc:
        raise tuf_exc.DownloadError(f"{url}: {exc}") from exc
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.connect()  # TCP, and the TLS handshake for https, within the connect timeout
        sock = conn.sock
        assert sock is not None
        sock.settimeout(min(http.read_timeout_s, max(deadline.remaining(), 0.001)))
        conn.request("GET", path, headers=dict(headers))
        response = conn.getresponse()
    except ssl.SSLCertVerificationError as exc:  # the peer is not trusted: no retry changes that
        conn.close()
        raise tuf_exc.DownloadError(f"{url}: {exc.__class__.__name__}: {exc}") from exc
    except (OSError, HTTPException) as exc:
        # refused, reset, a broken TLS handshake, a connect or header timeout: the connection broke
        # before the body, so it is resumed like a cut mid-body (within the attempts and deadline)
        conn.close()
        deadline.check(url)
        raise Interrupted(f"{url}: connection failed: {exc.__class__.__name__}: {exc}") from exc
    except ValueError as exc:
        conn.close()
        raise tuf_exc.DownloadError(f"{url}: {exc.__class__.__name__}: {exc}") from exc
    reply = _Reply(conn, sock, response, response.status, {k.lower(): v for k, v in response.getheaders()})
    if io.on_response is not None:
        try:
            io.on_response(reply.status, reply.headers)
        except BaseException:
            reply.close()
            raise
    return reply


def _one_pass(io: _PassIO, partial: Path, expected_length: int, expected_sha256: str) -> None:
    url = io.url
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > expected_length:
        have = 0
    if have == expected_length:
        if hash_prefix(partial, have).hexdigest() == expected_sha256:
            return
        have = 0  # complete but wrong: start over
    allow_range = True
    for _ in range(2):  # a second round only after a 416 / unusable 206
        start = have if allow_range else 0
        headers = io.http.headers(url)
        if start > 0:
            headers["Range"] = f"bytes={start}-"
        reply = _request(io, headers)
        try:
            status = reply.status
            if status == 416:
                log.info("%s: range %d- not satisfiable; restarting from zero", url, start)
                allow_range = False
                continue
            if status in TRANSIENT_STATUSES:
                raise Interrupted(f"{url}: HTTP {status} (transient; retried within the deadline)")
            if status >= 400:
                raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {status}", status)
            if status == 206:
                m = _CONTENT_RANGE_RE.match(reply.headers.get("content-range", ""))
                if m is None or int(m.group(1)) != start:
                    allow_range = False
                    continue
                if m.group(3) != "*" and int(m.group(3)) != expected_length:
                    raise _length_error(url, int(m.group(3)), expected_length)
            elif status == 200:
                start = 0
                declared = reply.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) != expected_length:
                    raise _length_error(url, int(declared), expected_length)
            else:
                raise tuf_exc.DownloadHTTPError(f"{url}: unexpected HTTP {status}", status)
            _receive(io, reply, partial, start, expected_length, expected_sha256)
            return
        finally:
            reply.close()
    raise tuf_exc.DownloadError(f"{url}: server refused every range request")


def _length_error(url: str, got: int, expected: int) -> LengthMismatch:
    cls = TooLarge if got > expected else LengthMismatch
    return cls(f"{url}: server has {got} bytes, expected {expected}")


def _receive(
    io: _PassIO, reply: _Reply, partial: Path, start: int, expected_length: int, expected_sha256: str
) -> None:
    """The body after ``start`` into ``partial`` (truncated there), hashed on top of its prefix."""
    url = io.url
    h = hash_prefix(partial, start) if start > 0 else hashlib.sha256()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        os.ftruncate(fd, start)
        os.lseek(fd, start, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    sink = HashWriter(fd, h)  # its write thread closes fd
    try:
        try:
            received = start + _pump(io, reply, sink, start, expected_length)
        finally:
            sink.close()  # everything received is written (kept for a resume) even on an error
    except TooLarge:
        partial.unlink(missing_ok=True)
        raise
    if received < expected_length:
        raise Interrupted(f"{url}: connection ended after {received} of {expected_length} bytes")
    if h.hexdigest() != expected_sha256:
        partial.unlink(missing_ok=True)
        raise HashMismatch(f"{url}: sha256 {h.hexdigest()} differs from the expected {expected_sha256}")


def _pump(io: _PassIO, reply: _Reply, sink: HashWriter, start: int, expected_length: int) -> int:
    """Socket reads straight into the sink's blocks, each span handed over as it arrives.

    Returns the body bytes received. Reads at most ``expected_length - start`` bytes plus one (to
    notice a server sending more: :class:`TooLarge`), and never beyond a declared Content-Length.
    """
    url, deadline, response, sock = io.url, io.deadline, reply.response, reply.sock
    limit = expected_length - start
    #: body bytes the server declared and we have not read yet; None: until the connection closes
    left: int | None = None if response.chunked else response.length
    read: Callable[[memoryview], int]
    if response.chunked:

        def read(view: memoryview) -> int:
            data = response.read1(len(view))
            view[: len(data)] = data
            return len(data)

    else:
        assert response.fp is not None
        read = response.fp.readinto1  # one recv() straight into our buffer (past http.client's own)
    read_timeout = sock.gettimeout() or io.http.read_timeout_s
    got = 0
    block, off, view = -1, 0, memoryview(b"")  # a block is taken before the first read
    while True:
        want = min(io.read_bytes, limit - got + 1)
        if left is not None:
            want = min(want, left)
        if want <= 0:
            return got
        if off == len(view):
            block, off = sink.take(deadline, url), 0
            view = sink.views[block]
        try:
            n = read(view[off : off + min(want, len(view) - off)])
        except TimeoutError as exc:
            deadline.check(url)
            raise Interrupted(f"{url}: stalled ({exc.__class__.__name__})") from exc
        except (OSError, HTTPException, ValueError) as exc:
            raise Interrupted(f"{url}: connection broke: {exc.__class__.__name__}: {exc}") from exc
        if not n:
            if left:  # fewer bytes than the response announced
                raise Interrupted(f"{url}: connection broke: closed {left} bytes before the announced end")
            return got
        if got + n > limit:
            raise TooLarge(f"{url}: more than the expected {expected_length} bytes")
        sink.put(block, off, off + n)
        off += n
        got += n
        if left is not None:
            left -= n
        deadline.check(url)
        if io.on_progress is not None:
            io.on_progress(start + got, expected_length)
        # every read waits at most min(read_timeout_s, time left)
        remaining = deadline.remaining()
        if remaining < read_timeout:
            read_timeout = max(remaining, 0.001)
            sock.settimeout(read_timeout)
