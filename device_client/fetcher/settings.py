"""How the device talks HTTP(S): token, certificates, timeouts (:class:`HttpSettings`), and the hard
total deadline every download keeps (:class:`Deadline`)."""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from ..config import DeviceSettings
from ..tlstrust import client_context
from .errors import DeadlineExceeded


@dataclass(frozen=True)
class HttpSettings:
    """How the device talks HTTP(S) to the server's repository and artifact endpoints.

    Requests send ``Authorization: Bearer <device token>`` when a token is configured and present
    the device's client certificate when one is; TLS is verified against the fleet CA when
    ``ca_cert`` is set, else against certifi's CAs, and the server's own origin against the pins
    of enrollment (``server_ca`` / ``server_fingerprint``)."""

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


class Deadline:
    """A hard *total* deadline: a server that drips a byte now and then cannot hold a download open
    beyond it.

    It is checked after every received chunk, and every socket read waits at most
    ``min(read_timeout_s, time left)``; so a download ends, at worst, one read after the deadline,
    i.e. within ``deadline_s + min(read_timeout_s, deadline_s)`` even when the peer stops sending."""

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
