"""HTTPS with optional client certificates for the cloud tier.

uvicorn verifies a client certificate against the fleet CA during the handshake
(``CERT_OPTIONAL``: a caller without one may still use its device token) but does not tell the
application who the peer is. :class:`ClientCertH11Protocol` is uvicorn's h11 protocol that, once
the handshake is done, hands the verified leaf certificate to every request of the connection in
the ASGI TLS extension (``scope["extensions"]["tls"]["client_cert_chain"]``, PEM).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import Settings
from server.trust.pki import CA_CERT_FILE


def _with_client_certificate(app: ASGIApp, pem: str) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            extensions = dict(scope.get("extensions") or {})
            extensions["tls"] = {**extensions.get("tls", {}), "client_cert_chain": [pem]}
            scope = {**scope, "extensions": extensions}
        await app(scope, receive, send)

    return wrapped


class ClientCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, passing the verified client certificate to the app."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            self.app = _with_client_certificate(self.app, ssl.DER_cert_to_PEM_cert(der))


def client_ca(settings: Settings) -> str:
    """The CA client certificates must chain to: ``cloud_client_ca``, else the fleet CA."""
    return str(settings.cloud_client_ca or settings.key_dir / CA_CERT_FILE)


def uvicorn_tls_options(settings: Settings) -> dict[str, Any]:
    """uvicorn options for HTTPS with optional client certificates (none without a certificate)."""
    if settings.cloud_tls_cert is None or settings.cloud_tls_key is None:
        return {}
    return {
        "ssl_certfile": str(settings.cloud_tls_cert),
        "ssl_keyfile": str(settings.cloud_tls_key),
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_ca_certs": client_ca(settings),
        "http": ClientCertH11Protocol,
    }
