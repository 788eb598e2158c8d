"""CSRs and keys for enrollment tests."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

HARDWARE = {
    "arch": "x86_64",
    "ram_mb": 4096,
    "cpu_count": 4,
    "onnxruntime_version": "1.32.0",
    "execution_providers": ["CPUExecutionProvider"],
}


def make_key(kind: str = "ec256"):
    if kind == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind == "rsa1024":
        return rsa.generate_private_key(65537, 1024)
    if kind == "rsa2048":
        return rsa.generate_private_key(65537, 2048)
    raise ValueError(kind)


def make_csr(cn: str | None, key=None, *, extra_cn: str | None = None) -> tuple[str, object]:
    key = key or make_key()
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")]
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    if extra_cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, extra_cn))
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def web_server_cert(directory: Path, name: str = "api") -> tuple[Path, Path, Path]:
    """(CA file, certificate, key) of a TLS server certificate for 127.0.0.1, issued by a CA of
    its own in ``directory/<name>-ca`` (what ``FLEET_TLS_CERT`` / ``FLEET_TLS_KEY`` take)."""
    from server.trust.keys import atomic_write, private_key_pem
    from server.trust.pki import CA_CERT_FILE, FleetCA, cert_pem

    ca = FleetCA(directory / f"{name}-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    cert, keyfile = directory / f"{name}.crt", directory / f"{name}.key"
    atomic_write(cert, cert_pem(ca.issue_server(key.public_key(), "fleet-api", [], ["127.0.0.1"])).encode())
    atomic_write(keyfile, private_key_pem(key), mode=0o600)
    return directory / f"{name}-ca" / CA_CERT_FILE, cert, keyfile
