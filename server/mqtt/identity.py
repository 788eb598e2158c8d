"""The server's MQTT identities: one certificate per connection, its CN the connection's client id.

The broker binds every client id to its certificate (``use_username_as_clientid``: the client id
is the certificate's CN), so each connection of a server has a CN of its own: ``fleet_server.NAME``
consumes, ``fleet_server.NAME.pub`` publishes, ``fleet_server.NAME.ingest-I`` are several ingest
processes. NAME is ``FLEET_MQTT_SERVER_NAME`` (default HOST-PORT). No device id has ``_`` or ``.``,
so no device can hold these ids. The server issues these certificates itself from the fleet CA as
it connects; the broker's ACL gives server rights to each CN it lists (``write_broker_config``).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from device_client.protocol.topics import SERVER_MQTT_USERNAME
from server.config import SERVER_NAME_MAX, SERVER_NAME_PATTERN, Settings
from server.trust.keys import private_key_pem
from server.trust.pki import FleetCA

#: a server connection's certificate lives as long as its process, at most this long
IDENTITY_LIFETIME = timedelta(days=825)
#: a valid server name (``mqtt_server_name``)
SERVER_NAME_RE = re.compile(rf"^{SERVER_NAME_PATTERN}$")
_SERVER_CN_RE = re.compile(
    rf"^{re.escape(SERVER_MQTT_USERNAME)}(\.{SERVER_NAME_PATTERN}(\.(pub|ingest-\d{{1,2}}))?)?$"
)


def default_server_name(hostname: str, port: int) -> str:
    """``HOST-PORT`` with every character but letters, digits and ``-`` made a ``-``, shortened
    (with a hash of the whole, so two long host names stay apart) to fit a certificate CN."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", f"{hostname}-{port}").strip("-") or str(port)
    if len(name) > SERVER_NAME_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: SERVER_NAME_MAX - 9].rstrip('-')}-{digest}"
    return name


def server_name(settings: Settings) -> str:
    """This server's name in its identities: ``mqtt_server_name``, or HOST-PORT."""
    return settings.mqtt_server_name or default_server_name(socket.gethostname(), settings.port)


def consumer_id(name: str) -> str:
    """The consuming link's identity (in-process, or a lone ingest process: the same session)."""
    return f"{SERVER_MQTT_USERNAME}.{name}"


def publisher_id(name: str) -> str:
    return f"{consumer_id(name)}.pub"


def ingest_id(name: str, index: int, count: int) -> str:
    """Ingest process ``index`` of ``count``: one keeps the consuming link's identity."""
    return consumer_id(name) if count == 1 else f"{consumer_id(name)}.ingest-{index}"


def connection_ids(name: str, ingest_processes: int) -> list[str]:
    """Every identity a server named ``name`` connects with (what the broker ACL must list)."""
    ids = [consumer_id(name), publisher_id(name)]
    if ingest_processes > 1:
        ids += [ingest_id(name, i, ingest_processes) for i in range(ingest_processes)]
    return ids


def server_connection_ids(settings: Settings) -> list[str]:
    return connection_ids(server_name(settings), settings.ingest_processes)


def is_server_identity(cn: str) -> bool:
    """``fleet_server`` (operator tools) or a server connection's identity."""
    return bool(_SERVER_CN_RE.fullmatch(cn))


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate and its key, in memory; ``cn`` is the client id the broker gives it."""

    cn: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @classmethod
    def issue(cls, ca: FleetCA, cn: str, lifetime: timedelta = IDENTITY_LIFETIME) -> ClientIdentity:
        """A fresh key and a certificate for ``cn`` from the fleet CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(key, hashes.SHA256())
        )
        cert = ca.issue_client(csr, cn, lifetime.days, lifetime=lifetime)
        return cls(cn=cn, cert_pem=cert.public_bytes(Encoding.PEM), key_pem=private_key_pem(key))

    def ssl_context(self, ca_file: Path) -> ssl.SSLContext:
        """A TLS client context presenting this identity and trusting ``ca_file`` for the broker.
        OpenSSL loads a key only from a file: it lives in a private (0700) directory for the load."""
        context = ssl.create_default_context(cafile=str(ca_file))
        with tempfile.TemporaryDirectory(prefix="fleet-mqtt-") as tmp:
            cert, key = Path(tmp) / "client.crt", Path(tmp) / "client.key"
            cert.write_bytes(self.cert_pem)
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(self.key_pem)
            context.load_cert_chain(str(cert), str(key))
        return context
