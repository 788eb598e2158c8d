"""Private key files: created 0600 in 0700 directories, written atomically, loaded by role name."""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from device_client.protocol.fsutil import atomic_write, private_dir

__all__ = [
    "atomic_write",
    "load_or_create_ec",
    "load_or_create_ed25519",
    "secure_key_dir",
    "write_private_key",
]

log = logging.getLogger(__name__)
#: the private keys in a key directory (key_dir, broker_dir)
KEY_FILES = ("*.key",)


def secure_key_dir(key_dir: Path) -> None:
    """Create ``key_dir`` 0700, or tighten an existing one to 0700 and its ``*.key`` files to 0600
    (a copy, a restore or an older release may have left them readable by others); each change
    is logged."""
    for change in private_dir(key_dir, KEY_FILES):
        log.warning("permissions of a key file or directory: %s", change)


def private_key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private_key(path: Path, key: PrivateKeyTypes) -> None:
    """Store ``key`` as unencrypted PKCS#8 PEM readable by the owner only, in a 0700 directory."""
    secure_key_dir(path.parent)
    atomic_write(path, private_key_pem(key), mode=0o600)


def load_private_key(path: Path) -> PrivateKeyTypes:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def load_or_create_ed25519(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key at ``path``, generated (0600) on first use."""
    if path.exists():
        key = load_private_key(path)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    write_private_key(path, key)
    return key


def load_or_create_ec(path: Path) -> ec.EllipticCurvePrivateKey:
    """The EC P-256 key at ``path``, generated (0600) on first use."""
    if path.exists():
        key = load_private_key(path)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    write_private_key(path, key)
    return key
