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
from .errors import DeadlineExceeded


@dataclass(frozen=True)
class HttpSettings:
    """How the device talks HTTP(S) to the server's repository and artifact endpoints.

    Requests send ``Authorization: Bearer <device token>`` when a token is configured and present
    the device's client certificate when one is; TLS is verified against the fleet CA when
    ``ca_cert`` is set, else against certifi's CAs."""

    token: str | None = None
    #: send ``token`` only to URLs of this origin (:func:`url_origin`; the daemon sets the server's),
    #: so a static server or CDN serving the targets never sees it; None: to every URL
    token_origin: str | None = None
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

    def headers(self, url: str) -> dict[str, str]:
        """Request headers for ``url``: the bearer token only where :attr:`token_origin` allows."""
        h = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        if self.token and (self.token_origin is None or url_origin(url) == self.token_origin):
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def ssl_context(self) -> ssl.SSLContext:
        """Server verification against ``ca_cert`` (the fleet CA) or, without one, certifi's CAs
        (httpx's default), and the client certificate when one is configured."""
        if self.ca_cert is None and self.client_cert is None:
            return httpx.create_ssl_context(verify=True, trust_env=False)
        ctx = ssl.create_default_context(cafile=str(self.ca_cert) if self.ca_cert else None)
        if self.client_cert is not None and self.client_key is not None:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx

    def client(self) -> httpx.Client:
        return httpx.Client(verify=self.ssl_context(), follow_redirects=False, trust_env=False)


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
