"""Enrollment: the device makes its own key, asks the server to certify it, and stores its identity.

``enroll(server_url, token, data_dir)``:

1. generates an EC P-256 key on the device (it never leaves it) and a CSR whose CN is the device
   id (``--device-id``, or a generated ``dev-<12 hex>``);
2. collects :class:`~device_client.protocol.HardwareFacts` (arch, RAM, CPU count, onnxruntime
   version and execution providers, OS);
3. ``POST {server}/api/v1/enroll`` with the one-time enrollment token;
4. stores in ``data_dir`` (created 0700)::

       identity.json        device id, server/MQTT/TUF/cloud endpoints, device token,  0600
                            tags
       device.key           the private key                                            0600
       device.crt           the client certificate (CN = device id)                    0644
       ca.crt               the fleet CA (verifies the broker; trust anchor for mTLS)   0644
       director.pem         the director's Ed25519 public key (verifies DesiredStates)  0644
                            (later superseded by director-keys.json, synced through TUF)
       tuf/root.json        the TUF trusted root the device pins from now on           0644
       server-ca.crt        the CA given with --ca-file, if any (verifies the server)   0644

The answer carries every trust anchor the device keeps, so the server must be reached over
``https://``: plain ``http://`` is refused unless ``insecure_http`` (``--insecure-http``, a lab) is
set, and so is an answer whose TUF metadata URL (where the device token goes) is plain HTTP. The
server's certificate is verified against the system's CAs, or the CA file ``ca_file``, and/or must
have the SHA-256 fingerprint ``server_fingerprint`` (:mod:`device_client.tlstrust`); both pins are
stored in ``identity.json`` and hold for the daemon's later requests to the server too.

Every file is written through a temp file, fsync and ``os.replace``. The key is written before the
request (so a crash cannot leave a certificate without its key) and removed again if enrollment
fails. An already enrolled directory is refused.

Tags: the server assigns a device's tags from its enrollment token (``EnrollRequest`` has no tags
field), so ``--tags`` only records the tags the installer expected in ``identity.json`` and warns
when the server's differ.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import ssl
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from .config import API_TOKEN_FILE
from .protocol import HardwareFacts, is_valid_device_id
from .protocol.enrollment import EnrollRequest, EnrollResponse
from .protocol.fsutil import atomic_write, private_dir
from .protocol.signing import public_key_from_pem
from .tlstrust import client_context, normalize_fingerprint, require_https

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
KEY_FILE = "device.key"
CERT_FILE = "device.crt"
CA_FILE = "ca.crt"
DIRECTOR_FILE = "director.pem"
#: the director key list last synced from the image repository (replaces director.pem once present)
DIRECTOR_KEYS_FILE = "director-keys.json"
TUF_DIR = "tuf"
SERVER_CA_FILE = "server-ca.crt"
#: what in the data dir only the daemon may read
SECRET_FILES = (KEY_FILE, IDENTITY_FILE, API_TOKEN_FILE)


class EnrollError(Exception):
    """Enrollment failed; nothing usable was stored."""


@dataclass
class Identity:
    """What enrollment stored; the daemon starts from it."""

    device_id: str
    server_url: str
    mqtt_host: str
    mqtt_port: int
    mqtt_tls: bool
    tuf_metadata_url: str
    tuf_targets_url: str
    device_token: str
    data_dir: Path
    tags: dict[str, str] = field(default_factory=dict)
    requested_tags: dict[str, str] = field(default_factory=dict)
    #: TLS pins of the server given at enrollment: a CA file in ``data_dir``, a certificate's SHA-256
    server_ca: str | None = None
    server_fingerprint: str | None = None
    #: the fleet cloud tier's base URL from the enrollment answer (FLEET_DEVICE_CLOUD_URL overrides)
    cloud_url: str | None = None

    @property
    def server_ca_file(self) -> Path | None:
        return self.data_dir / self.server_ca if self.server_ca else None

    @property
    def key_file(self) -> Path:
        return self.data_dir / KEY_FILE

    @property
    def cert_file(self) -> Path:
        return self.data_dir / CERT_FILE

    @property
    def ca_file(self) -> Path:
        return self.data_dir / CA_FILE

    @property
    def director_file(self) -> Path:
        return self.data_dir / DIRECTOR_FILE

    @property
    def director_keys_file(self) -> Path:
        return self.data_dir / DIRECTOR_KEYS_FILE

    @property
    def tuf_dir(self) -> Path:
        return self.data_dir / TUF_DIR

    def director_keys(self) -> list[Any]:
        """The director keys trusted now: the synced list if any, else the enrollment pin."""
        from .trust import DirectorKeyring

        return DirectorKeyring(self.director_file, self.director_keys_file).keys

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc.pop("data_dir")
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def load(cls, data_dir: Path) -> Identity:
        """The stored identity; its directory is tightened to 0700 and the device key, the
        identity (it holds the device token) and the API token file to 0600 (each change logged)."""
        path = Path(data_dir) / IDENTITY_FILE
        try:
            doc = json.loads(path.read_bytes())
            identity = cls(data_dir=Path(data_dir).absolute(), **doc)
        except FileNotFoundError:
            raise EnrollError(f"{path} not found: run `fleet device enroll` first") from None
        except (ValueError, TypeError) as exc:
            raise EnrollError(f"{path} is unreadable: {exc}") from None
        for change in private_dir(identity.data_dir, SECRET_FILES):
            log.warning("permissions of a secret file or directory: %s", change)
        return identity


#: CPU features that decide whether int8 inference is fast: x86 VNNI and AVX2, Arm dot product
#: and int8 matrix multiply (as /proc/cpuinfo names them)
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "avx2", "asimddp", "i8mm")


def cpu_flags_from_cpuinfo(text: str) -> list[str]:
    """The :data:`INT8_CPU_FLAGS` named on a ``flags`` (x86) or ``Features`` (Arm) line."""
    found: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            found.update(value.split())
    return [f for f in INT8_CPU_FLAGS if f in found]


def read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> list[str]:
    try:
        return cpu_flags_from_cpuinfo(path.read_text(errors="replace"))
    except OSError:
        return []


def hardware_facts(cpu_flags: str | None = None) -> HardwareFacts:
    """What this device is: architecture, memory, CPUs, int8 CPU flags and the onnxruntime it
    runs. ``cpu_flags`` (comma-separated, the ``cpu_flags`` setting) replaces /proc/cpuinfo's."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError, AttributeError):
        ram = 0
    try:
        import onnxruntime as ort

        ort_version, providers = ort.__version__, list(ort.get_available_providers())
    except ImportError:  # pragma: no cover - the device extra installs it
        ort_version, providers = "none", []
    return HardwareFacts(
        arch=(platform.machine() or "unknown")[:32],
        ram_mb=max(int(ram), 0),
        cpu_count=os.cpu_count() or 1,
        onnxruntime_version=ort_version[:32],
        execution_providers=providers[:32],
        os=f"{platform.system()} {platform.release()}"[:64],
        cpu_flags=(
            read_cpu_flags()
            if cpu_flags is None
            else [f.strip() for f in cpu_flags.split(",") if f.strip()][:16]
        ),
    )


def new_device_id() -> str:
    return f"dev-{secrets.token_hex(6)}"


def make_csr(device_id: str, key: ec.EllipticCurvePrivateKey) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _server_trust(
    server_url: str, insecure_http: bool, ca_file: Path | None, fingerprint: str | None
) -> ssl.SSLContext | bool:
    """What verifies the server (httpx's ``verify``); EnrollError for a refused URL or bad pins."""
    try:
        require_https(server_url, insecure_http=insecure_http)
        if fingerprint is not None:
            normalize_fingerprint(fingerprint)
    except ValueError as exc:
        raise EnrollError(str(exc)) from None
    if ca_file is None and fingerprint is None:
        return True
    if urlsplit(server_url).scheme.lower() != "https":
        raise EnrollError("--ca-file and --server-fingerprint pin TLS: they need an https:// server URL")
    try:
        return client_context(ca_file=ca_file, fingerprint=fingerprint)
    except (OSError, ssl.SSLError) as exc:
        raise EnrollError(f"cannot use the CA file {ca_file}: {exc}") from None


def enroll(
    server_url: str,
    token: str,
    data_dir: Path,
    *,
    device_id: str | None = None,
    tags: dict[str, str] | None = None,
    timeout_s: float = 30.0,
    insecure_http: bool = False,
    ca_file: Path | None = None,
    server_fingerprint: str | None = None,
) -> Identity:
    """Enroll this device with ``server_url`` and store its identity in ``data_dir``.

    ``server_url`` must be ``https://`` unless ``insecure_http``; ``ca_file`` and
    ``server_fingerprint`` pin the server's TLS (see the module docstring)."""
    data_dir = Path(data_dir).absolute()
    device_id = device_id or new_device_id()
    if not is_valid_device_id(device_id):
        raise EnrollError(f"invalid device id {device_id!r}: use [a-z0-9][a-z0-9-]{{0,62}}")
    verify = _server_trust(server_url, insecure_http, ca_file, server_fingerprint)
    fingerprint = normalize_fingerprint(server_fingerprint) if server_fingerprint else None
    if (data_dir / IDENTITY_FILE).exists():
        raise EnrollError(f"{data_dir} is already enrolled ({IDENTITY_FILE} exists)")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(data_dir / KEY_FILE, key_pem, 0o600)
    try:
        request = EnrollRequest(token=token, csr_pem=make_csr(device_id, key), hardware=hardware_facts())
        url = server_url.rstrip("/") + "/api/v1/enroll"
        try:
            r = httpx.post(url, json=request.model_dump(mode="json"), timeout=timeout_s, verify=verify)
        except httpx.HTTPError as exc:
            raise EnrollError(f"cannot reach {url}: {exc}") from None
        if r.status_code != 201:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise EnrollError(f"enrollment refused ({r.status_code}): {detail}")
        try:
            resp = EnrollResponse.model_validate(r.json())
        except (ValueError, ValidationError) as exc:
            raise EnrollError(f"unexpected enrollment response: {exc}") from None
        if resp.device_id != device_id:
            raise EnrollError(f"server enrolled {resp.device_id!r}, expected {device_id!r}")
        if urlsplit(resp.tuf_metadata_url).scheme.lower() != "https" and not insecure_http:
            raise EnrollError(
                f"the server hands out a plain-HTTP TUF metadata URL ({resp.tuf_metadata_url}), where the "
                "device token would cross the network in clear: set FLEET_PUBLIC_URL to the server's "
                "https:// address (or enroll with --insecure-http in a lab)"
            )
        if resp.cloud_url is not None:
            try:  # the device token goes there with every escalation
                require_https(resp.cloud_url, insecure_http=insecure_http)
            except ValueError as exc:
                raise EnrollError(
                    f"unusable cloud tier URL in the enrollment answer: {exc} (set FLEET_CLOUD_PUBLIC_URL "
                    "on the server to an https:// address)"
                ) from None
        cert = x509.load_pem_x509_certificate(resp.certificate_pem.encode())
        if cert.public_key() != key.public_key():
            raise EnrollError("the issued certificate is not for this device's key")
        public_key_from_pem(resp.director_public_key_pem)  # refuse an unusable director key now

        atomic_write(data_dir / CERT_FILE, resp.certificate_pem.encode(), 0o644)
        atomic_write(data_dir / CA_FILE, resp.ca_certificate_pem.encode(), 0o644)
        atomic_write(data_dir / DIRECTOR_FILE, resp.director_public_key_pem.encode(), 0o644)
        tuf_dir = data_dir / TUF_DIR
        tuf_dir.mkdir(exist_ok=True, mode=0o700)
        atomic_write(tuf_dir / "root.json", json.dumps(resp.tuf_root).encode(), 0o644)
        if ca_file is not None:
            atomic_write(data_dir / SERVER_CA_FILE, Path(ca_file).read_bytes(), 0o644)
        identity = Identity(
            device_id=device_id,
            server_url=server_url.rstrip("/"),
            mqtt_host=resp.mqtt.host,
            mqtt_port=resp.mqtt.port,
            mqtt_tls=resp.mqtt.tls,
            tuf_metadata_url=resp.tuf_metadata_url,
            tuf_targets_url=resp.tuf_targets_url,
            device_token=resp.device_token,
            data_dir=data_dir,
            tags=dict(resp.tags),
            requested_tags=dict(tags or {}),
            server_ca=SERVER_CA_FILE if ca_file is not None else None,
            server_fingerprint=fingerprint,
            cloud_url=resp.cloud_url.rstrip("/") if resp.cloud_url else None,
        )
        if tags and dict(tags) != dict(resp.tags):
            log.warning(
                "requested tags %s differ from the enrollment token's %s (the token's tags apply)",
                tags,
                resp.tags,
            )
        atomic_write(data_dir / IDENTITY_FILE, identity.to_json(), 0o600)
        log.info("enrolled as %s with %s", device_id, server_url)
        return identity
    except BaseException:
        (data_dir / KEY_FILE).unlink(missing_ok=True)
        raise
