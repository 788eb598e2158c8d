"""How the device trusts the control server's TLS: the system's CAs, a pinned CA file, or a pinned
certificate fingerprint (the SHA-256 of the server's leaf certificate, checked on every handshake
before a byte of the request is sent).

Enrollment refuses plain ``http://`` unless it is explicitly allowed (a lab): the enrollment answer
carries every trust anchor the device keeps (TUF root, director key, fleet CA, MQTT endpoint).
The pins given at enrollment are stored with the identity and used for the daemon's later requests.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class InsecureServerUrl(ValueError):
    """A plain-HTTP (or otherwise unusable) server URL where TLS is required."""


def normalize_fingerprint(text: str) -> str:
    """``text`` as 64 lower-case hex digits: accepts ``AB:CD:...`` (``openssl x509 -fingerprint
    -sha256``), plain hex and an optional ``sha256:`` / ``SHA256 Fingerprint=`` prefix."""
    value = text.strip()
    for prefix in ("sha256 fingerprint=", "sha256:", "sha256="):
        if value.lower().startswith(prefix):
            value = value[len(prefix) :]
    value = value.replace(":", "").replace(" ", "").lower()
    if not _HEX64.match(value):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
    return value


def certificate_fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, as :func:`normalize_fingerprint` writes it."""
    return hashlib.sha256(der).hexdigest()


def require_https(url: str, *, insecure_http: bool = False) -> None:
    """Refuse ``url`` unless it is ``https://`` (or ``http://`` with ``insecure_http``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise InsecureServerUrl(f"{url!r} is not an http(s) URL")
    if scheme == "http" and not insecure_http:
        raise InsecureServerUrl(
            f"refusing plain HTTP to {url}: whoever sits on the path could hand this device a trust "
            "root of its own. Use https:// (with --ca-file or --server-fingerprint for a private "
            "certificate), or --insecure-http in a lab"
        )


class PinnedContext(ssl.SSLContext):
    """An SSL context that also requires the peer's certificate to have :attr:`fingerprint`."""

    fingerprint: str = ""

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        wrapped = super().wrap_socket(sock, *args, **kwargs)
        try:
            if not kwargs.get("do_handshake_on_connect", True):
                wrapped.do_handshake()
            der = wrapped.getpeercert(binary_form=True)
            seen = certificate_fingerprint(der) if der else "none"
            if seen != self.fingerprint:
                raise ssl.SSLCertVerificationError(
                    f"server certificate fingerprint {seen} is not the pinned {self.fingerprint}"
                )
        except BaseException:
            wrapped.close()
            raise
        return wrapped


def client_context(
    *,
    ca_file: Path | None = None,
    fingerprint: str | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> ssl.SSLContext:
    """A client context verifying the server against ``ca_file`` (else the system's CAs) and, with
    ``fingerprint``, requiring exactly that certificate. A fingerprint alone replaces CA and
    host-name verification (it names the one certificate accepted, self-signed ones included)."""
    if fingerprint:
        pinned = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.fingerprint = normalize_fingerprint(fingerprint)
        ctx: ssl.SSLContext = pinned
        if ca_file is not None:
            ctx.load_verify_locations(cafile=str(ca_file))
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None and client_key is not None:
        ctx.load_cert_chain(str(client_cert), str(client_key))
    return ctx
