"""The fleet CA (``cryptography.x509``): device client certificates, broker certificates, CRL.

Device certificates carry CN = device id and the clientAuth EKU. The CA key lives in the server's
key directory (0600). Decommissioning a device puts its serial on the CRL, which the broker loads
(``crlfile`` in the generated mosquitto.conf).

A CRL carries a ``nextUpdate``: past it, OpenSSL refuses *every* handshake of a broker with CRL
checking ("CRL has expired"), so the CRL file must be re-issued before then (see
:meth:`FleetCA.crl_refresh_reason` and ``server.devices.crl.refresh_broker_crl``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_client.protocol.topics import is_valid_device_id
from server.errors import Invalid
from server.trust.keys import atomic_write, load_or_create_ec

CA_KEY_FILE = "fleet-ca.key"
CA_CERT_FILE = "fleet-ca.crt"
MIN_RSA_BITS = 2048
#: larger RSA keys (and exponents) only make verifying the CSR and later handshakes costly
MAX_RSA_BITS = 8192
MAX_RSA_EXPONENT = 2**32
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)
#: how long a CRL is valid (its ``nextUpdate``); it is re-issued once less than half of this is left
CRL_VALIDITY = timedelta(days=30)
#: ``lastUpdate`` is set this far in the past (clock skew between the server and the broker)
CRL_BACKDATE = timedelta(minutes=5)


def _name(cn: str, org: str = "fleetota") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def check_public_key(key: object) -> None:
    """Accept EC P-256/P-384, Ed25519 and RSA of 2048-8192 bits with an odd public exponent below
    2^32 (65537 is the norm; a huge one makes every verification as slow as a signature); raise
    :class:`Invalid` otherwise."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ACCEPTED_CURVES):
            raise Invalid(f"EC curve {key.curve.name} is not accepted (use P-256 or P-384)")
        return
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise Invalid(f"RSA key of {key.key_size} bits is too small (minimum {MIN_RSA_BITS})")
        if key.key_size > MAX_RSA_BITS:
            raise Invalid(f"RSA key of {key.key_size} bits is too large (maximum {MAX_RSA_BITS})")
        e = key.public_numbers().e
        if e < 3 or e >= MAX_RSA_EXPONENT or e % 2 == 0:
            raise Invalid("RSA public exponent is not accepted (use 65537; an odd number below 2^32)")
        return
    raise Invalid(f"key type {type(key).__name__} is not accepted")


def parse_csr(csr_pem: str) -> tuple[x509.CertificateSigningRequest, str]:
    """Load and check a device CSR: acceptable key (checked first: its size and exponent bound the
    cost of the signature check), valid signature, CN a valid device id."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise Invalid(f"CSR is not a PEM certificate signing request: {exc}") from None
    # cryptography parses lazily: a key on a curve it does not implement (secp112r1, ...) or a
    # malformed key or subject only raises here, as UnsupportedAlgorithm/ValueError/TypeError
    try:
        public_key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError, TypeError) as exc:
        raise Invalid(f"CSR public key is not supported: {exc}") from None
    check_public_key(public_key)
    try:
        signature_ok = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError, TypeError) as exc:
        raise Invalid(f"CSR signature cannot be checked: {exc}") from None
    if not signature_ok:
        raise Invalid("CSR signature does not verify")
    try:
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, TypeError) as exc:
        raise Invalid(f"CSR subject cannot be parsed: {exc}") from None
    if len(cns) != 1:
        raise Invalid("CSR subject must have exactly one CN (the device id)")
    cn = str(cns[0].value)
    if not is_valid_device_id(cn):
        raise Invalid(f"CSR CN {cn!r} is not a valid device id ([a-z0-9][a-z0-9-]{{0,62}})")
    return csr, cn


def crl_entries(crl: x509.CertificateRevocationList) -> list[tuple[str, datetime]]:
    """The ``(serial_hex, revoked_at)`` pairs a CRL lists."""
    return [(format(r.serial_number, "x"), r.revocation_date_utc) for r in crl]


class FleetCA:
    """The fleet's certificate authority, stored in ``key_dir``."""

    def __init__(self, key_dir: Path) -> None:
        self.key_dir = key_dir
        self.key = load_or_create_ec(key_dir / CA_KEY_FILE)
        cert_path = key_dir / CA_CERT_FILE
        if cert_path.exists():
            self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        else:
            self.cert = self._self_sign()
            atomic_write(cert_path, self.cert.public_bytes(serialization.Encoding.PEM))

    def _self_sign(self) -> x509.Certificate:
        now = datetime.now(UTC)
        name = _name("fleetota fleet CA")
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> str:
        return cert_pem(self.cert)

    def _leaf(
        self, subject: x509.Name, public_key: CertificatePublicKeyTypes, lifetime: timedelta
    ) -> x509.CertificateBuilder:
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )

    def issue_client(
        self, csr: x509.CertificateSigningRequest, cn: str, days: int, *, lifetime: timedelta | None = None
    ) -> x509.Certificate:
        """A client-auth certificate for ``cn`` (a device id or one of the server's MQTT
        identities), valid for ``days``, or for ``lifetime`` when given."""
        return (
            self._leaf(_name(cn), csr.public_key(), lifetime or timedelta(days=days))
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue_server(
        self,
        public_key: CertificatePublicKeyTypes,
        cn: str,
        dns_names: Iterable[str],
        ips: Iterable[str],
        days: int = 825,
    ) -> x509.Certificate:
        """A server-auth certificate (the broker's), with the given subject alternative names."""
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        return (
            self._leaf(_name(cn), public_key, timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def crl(
        self,
        revoked: Iterable[tuple[str, datetime]],
        validity: timedelta = CRL_VALIDITY,
        *,
        now: datetime | None = None,
    ) -> x509.CertificateRevocationList:
        """A CRL listing ``(serial_hex, revoked_at)`` pairs, valid for ``validity`` from ``now``."""
        now = now or datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - CRL_BACKDATE)
            .next_update(now + validity)
        )
        for serial, at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(at).build()
            )
        return builder.sign(self.key, hashes.SHA256())

    def write_crl(
        self,
        path: Path,
        revoked: Iterable[tuple[str, datetime]],
        validity: timedelta = CRL_VALIDITY,
        *,
        now: datetime | None = None,
    ) -> None:
        atomic_write(path, self.crl(revoked, validity, now=now).public_bytes(serialization.Encoding.PEM))

    def load_crl(self, path: Path) -> x509.CertificateRevocationList | None:
        """The CRL at ``path`` if it exists, parses and carries this CA's valid signature."""
        try:
            return self.parse_crl(path.read_bytes())
        except OSError:
            return None

    def parse_crl(self, pem: bytes) -> x509.CertificateRevocationList | None:
        """The PEM CRL ``pem`` if it parses and carries this CA's valid signature."""
        try:
            crl = x509.load_pem_x509_crl(pem)
        except ValueError:
            return None
        try:
            ok = crl.issuer == self.cert.subject and crl.is_signature_valid(self.key.public_key())
        except (UnsupportedAlgorithm, ValueError, TypeError):
            ok = False
        return crl if ok else None

    def crl_refresh_reason(
        self, path: Path, revoked: Iterable[tuple[str, datetime]] | None, *, now: datetime | None = None
    ) -> str | None:
        """Why the CRL at ``path`` must be re-issued, or None if it is current.

        It must be when it is missing, unreadable or not signed by this CA; when less than half
        of its validity is left (long before OpenSSL refuses every handshake at ``nextUpdate``);
        and, when ``revoked`` is given, when it does not list exactly those serials."""
        now = now or datetime.now(UTC)
        crl = self.load_crl(path)
        if crl is None:
            return "missing, unreadable or not signed by the fleet CA"
        last, nxt = crl.last_update_utc, crl.next_update_utc
        if nxt is None:
            return "has no nextUpdate"
        if nxt - now < (nxt - last) / 2:
            return f"expires at {nxt.isoformat()} (less than half of its validity left)"
        if revoked is not None:
            listed = {r.serial_number for r in crl}
            wanted = {int(serial, 16) for serial, _ in revoked}
            if listed != wanted:
                return f"lists {len(listed)} serials, not the {len(wanted)} revoked in the database"
        return None
