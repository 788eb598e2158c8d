"""Bounded downloads: a ``tuf.ngclient`` fetcher over httpx and a resumable bundle download.

Both send ``Authorization: Bearer <device token>`` when a token is configured (and present the
device's client certificate when one is; TLS is verified against the fleet CA when ``ca_cert`` is
set, else against certifi's CAs, and the server's own origin against the pins of enrollment,
``server_ca`` / ``server_fingerprint``), stream the body, cap its size, and enforce a hard *total*
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

The bundle download is built for throughput (bundles are large; metadata files are small and stay
on httpx). httpx reads the socket 64 KB at a time through several Python layers, which alone held
it to about a third of ``openssl dgst -sha256``. So :func:`download_resumable` speaks HTTP/1.1 with
``http.client`` (one connection per request, the same TLS settings) and reads the socket straight
into a small pool of 1 MiB blocks (``readinto``, up to ``read_bytes`` per read); a hash thread and
a write thread take the received spans in order (:class:`_HashWriter`), so receiving, hashing and
writing overlap (``hashlib`` and ``os.write`` release the GIL on large buffers) with no copies
between them, and the periodic fsync runs on a third thread so disk writeback overlaps the
download too. Every byte received is written (in order) before the call returns or raises, so an
interruption keeps all of it for the resume.

All errors are ``tuf.api.exceptions.DownloadError`` subclasses, so the TUF updater handles them too;
errors of the local file (``ENOSPC`` while writing) stay ``OSError``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException, HTTPResponse, HTTPSConnection
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface

from .config import DeviceSettings
from .tlstrust import client_context

log = logging.getLogger(__name__)

_FSYNC_EVERY = 16 * 1024 * 1024
#: the bundle download's buffers: _BLOCKS blocks of _BLOCK_BYTES in flight between the receiving
#: thread and the hash and write threads
_BLOCK_BYTES = 1024 * 1024
_BLOCKS = 4
#: the most one socket read of a bundle download takes (DeviceSettings.download_chunk_bytes)
DEFAULT_READ_BYTES = 256 * 1024
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
    """The connection failed (refused, reset, timed out, TLS handshake broken) or broke or stalled
    mid-body; the partial file is kept for a resume."""


@dataclass(frozen=True)
class HttpSettings:
    """How the device talks HTTP(S) to the server's repository and artifact endpoints."""

    token: str | None = None
    #: send ``token`` only to URLs of this origin (:func:`url_origin`; the daemon sets the server's),
    #: so a static server or CDN serving the targets never sees it; None: to every URL
    token_origin: str | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_cert: Path | None = None
    #: pins for the server's origin (``token_origin``; every URL when that is None) given at
    #: enrollment: its CA and/or the SHA-256 of its certificate (:mod:`device_client.tlstrust`)
    server_ca: Path | None = None
    server_fingerprint: str | None = None
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

    def headers(self, url: str) -> dict[str, str]:
        """Request headers for ``url``: the bearer token only where :attr:`token_origin` allows."""
        h = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        if self.token and (self.token_origin is None or url_origin(url) == self.token_origin):
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def pinned(self, url: str | None = None) -> bool:
        """Whether requests to ``url`` (None: the server) are held to the server pins."""
        if self.server_ca is None and not self.server_fingerprint:
            return False
        return url is None or self.token_origin is None or url_origin(url) == self.token_origin

    def ssl_context(self, url: str | None = None) -> ssl.SSLContext:
        """Server verification for ``url`` (None: the server): the server pins on its origin;
        elsewhere ``ca_cert`` (the fleet CA) or, without one, certifi's CAs (httpx's default);
        and the client certificate when one is configured."""
        return self._context(self.pinned(url))

    def _context(self, pinned: bool) -> ssl.SSLContext:
        if pinned:
            return client_context(
                ca_file=self.server_ca or self.ca_cert,
                fingerprint=self.server_fingerprint,
                client_cert=self.client_cert,
                client_key=self.client_key,
            )
        if self.ca_cert is None and self.client_cert is None:
            return httpx.create_ssl_context(verify=True, trust_env=False)
        return client_context(ca_file=self.ca_cert, client_cert=self.client_cert, client_key=self.client_key)

    def client(self) -> httpx.Client:
        if not self.pinned() or self.token_origin is None:
            return httpx.Client(verify=self.ssl_context(), follow_redirects=False, trust_env=False)
        transport = _OriginTransport(
            self.token_origin,
            httpx.HTTPTransport(verify=self._context(True), trust_env=False),
            httpx.HTTPTransport(verify=self._context(False), trust_env=False),
        )
        return httpx.Client(transport=transport, follow_redirects=False, trust_env=False)


class _OriginTransport(httpx.BaseTransport):
    """Requests to ``origin`` through one transport (the server, pinned), the rest another."""

    def __init__(self, origin: str, own: httpx.BaseTransport, other: httpx.BaseTransport) -> None:
        self.origin = origin
        self.own = own
        self.other = other

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        transport = self.own if url_origin(str(request.url)) == self.origin else self.other
        return transport.handle_request(request)

    def close(self) -> None:
        self.own.close()
        self.other.close()


def url_origin(url: str) -> str:
    """``scheme://host:port`` of ``url`` (host in lower case, the scheme's default port made
    explicit), for comparing where two URLs point."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{scheme}://{(parts.hostname or '').lower()}:{port or {'http': 80, 'https': 443}.get(scheme, 0)}"


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
        response = _send(self._client, url, self.http.headers(url), deadline, self.http)
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
    buf = memoryview(bytearray(_BLOCK_BYTES))
    with open(path, "rb", buffering=0) as fh:
        remaining = length
        while remaining > 0:
            n = fh.readinto(buf[: min(len(buf), remaining)])
            if not n:
                break
            h.update(buf[:n])
            remaining -= n
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
    """
    http = http or HttpSettings()
    expected_sha256 = expected_sha256.lower()
    final = final_path or _final_name(dest_partial)
    if expected_length > max_bytes:
        raise TooLarge(f"{url}: {expected_length} bytes exceeds the cap of {max_bytes}")
    deadline = _Deadline(deadline_s)
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
    deadline: _Deadline
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
        if _hash_prefix(partial, have).hexdigest() == expected_sha256:
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
    h = _hash_prefix(partial, start) if start > 0 else hashlib.sha256()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        os.ftruncate(fd, start)
        os.lseek(fd, start, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    sink = _HashWriter(fd, h)  # its write thread closes fd
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


def _pump(io: _PassIO, reply: _Reply, sink: _HashWriter, start: int, expected_length: int) -> int:
    """Socket reads straight into the sink's blocks, each span handed over as it arrives.

    Returns the body bytes received. Reads at most ``expected_length - start`` bytes plus one (to
    notice a server sending more: :class:`TooLarge`), and never beyond a declared Content-Length.
    """
    url, deadline, response, sock = io.url, io.deadline, reply.response, reply.sock
    limit = expected_length - start
    #: body bytes the server declared and we have not read yet; None: until the connection closes
    left: int | None = None if response.chunked else response.length
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


_Span = tuple[int, int, int]  # (block, start, end)
_NOTHING: _Span = (-1, 0, 0)


def _merged(q: queue.SimpleQueue[_Span | None]) -> Iterator[_Span]:
    """The spans put on ``q`` up to a None, adjacent ones (same block, end to start) merged."""
    item: _Span | None = q.get()
    while item is not None:
        block, first, end = item
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                item = _NOTHING
                break
            if item is None or item[0] != block or item[1] != end:
                break
            end = item[2]
        yield block, first, end
        if item is _NOTHING:
            item = q.get()


class _HashWriter:
    """Hashes and writes the received bytes, in order, on threads of its own.

    The receiving thread reads the socket straight into blocks of a fixed pool (:meth:`take`) and
    hands every received span over (:meth:`put`): the hash thread hashes spans and passes them on,
    the write thread writes them and returns a block to the pool once it has written it to its
    end, and every ``_FSYNC_EVERY`` bytes asks the fsync thread to sync (disk writeback overlaps the
    download and little is left for the final fsync). Adjacent spans are merged, so the threads work
    on up to a block at a time however small the reads are. ``hashlib`` and file writes release the
    GIL on large buffers, so receiving, hashing and writing run in parallel with no copies between
    them. Bounded: a receiver that is ahead waits in :meth:`take` for a free block.

    The write thread owns ``fd`` and closes it when it ends, so a receiver that gives up waiting
    in :meth:`close` can never leave a thread writing to a closed (or reused) descriptor.

    An error in a thread (an ``OSError`` such as ENOSPC from a write) is kept and raised in the
    receiving thread by its next :meth:`take` or by :meth:`close`; a failed thread keeps passing
    blocks on, so the receiver never waits forever.
    """

    def __init__(
        self, fd: int, h: hashlib._Hash, *, block_bytes: int = _BLOCK_BYTES, blocks: int = _BLOCKS
    ) -> None:
        self.fd = fd
        self.hash = h
        self.error: BaseException | None = None
        self._raised = False
        self._closed = False
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._to_hash: queue.SimpleQueue[_Span | None] = queue.SimpleQueue()
        self._to_write: queue.SimpleQueue[_Span | None] = queue.SimpleQueue()
        self._sync_due = threading.Event()
        self._writing = True
        self._hasher = threading.Thread(target=self._hash_loop, name="download-hash", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="download-write", daemon=True)
        self._syncer = threading.Thread(target=self._sync_loop, name="download-fsync", daemon=True)
        try:
            self.views = [memoryview(bytearray(block_bytes)) for _ in range(blocks)]
            for i in range(blocks):
                self._free.put(i)
            self._syncer.start()
            self._hasher.start()
            self._writer.start()  # from here on it closes fd
        except BaseException:  # no write thread: stop the others, close fd here
            self._writing = False
            self._sync_due.set()
            self._to_hash.put(None)
            os.close(fd)
            raise

    def take(self, deadline: _Deadline, url: str) -> int:
        """A free block (waiting for the write thread within the deadline)."""
        while True:
            self._raise()
            try:
                return self._free.get(timeout=max(deadline.remaining(), 0.001))
            except queue.Empty:
                deadline.check(url)

    def put(self, block: int, start: int, end: int) -> None:
        self._to_hash.put((block, start, end))

    def close(self) -> None:
        """Wait until every span handed over is hashed and written; raise a thread's error."""
        if not self._closed:
            self._closed = True
            self._to_hash.put(None)
            self._hasher.join()
            self._writer.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None and not self._raised:
            self._raised = True  # once: close() after a failed take() does not raise it again
            raise self.error

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

    def _hash_loop(self) -> None:
        try:
            for span in _merged(self._to_hash):
                if self.error is None:
                    block, start, end = span
                    try:
                        self.hash.update(self.views[block][start:end])
                    except BaseException as exc:  # handed to the receiving thread
                        self._fail(exc)
                self._to_write.put(span)
        finally:
            self._to_write.put(None)

    def _write_loop(self) -> None:
        try:
            since_sync = 0
            for block, start, end in _merged(self._to_write):
                if self.error is None:
                    try:
                        data = self.views[block][start:end]
                        while data:
                            data = data[os.write(self.fd, data) :]
                        since_sync += end - start
                        if since_sync >= _FSYNC_EVERY:
                            self._sync_due.set()
                            since_sync = 0
                    except BaseException as exc:  # handed to the receiving thread
                        self._fail(exc)
                if end == len(self.views[block]):
                    self._free.put(block)
        finally:
            self._writing = False
            self._sync_due.set()
            self._syncer.join()
            os.close(self.fd)

    def _sync_loop(self) -> None:
        while True:
            self._sync_due.wait()
            self._sync_due.clear()
            if not self._writing:
                return
            try:
                os.fsync(self.fd)
            except BaseException as exc:  # handed to the receiving thread
                self._fail(exc)
                return
