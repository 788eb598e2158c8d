"""Canonical JSON and Ed25519 envelopes for signed payloads (the director's DesiredState).

An envelope is ``{"signed": {...}, "signatures": [{"keyid": ..., "sig": ...}]}``. The signature
covers the canonical JSON of ``signed`` exactly as received (sorted keys, no whitespace, UTF-8), so
verification never depends on how a model re-serialises datetimes or floats.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import InvalidPayload, SignatureError

_HEX = re.compile(r"[0-9a-f]+")


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, compact separators, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def key_id(public_key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the raw public key bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_to_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def public_key_from_pem(pem: str | bytes) -> Ed25519PublicKey:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SignatureError(f"unreadable public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("public key is not Ed25519")
    return key


def sign_envelope(signed: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """Wrap ``signed`` (a JSON-ready dict) in an envelope signed by ``private_key``."""
    return sign_envelope_json(signed, private_key, key_id(private_key.public_key()))[0]


def sign_envelope_json(
    signed: dict[str, Any], private_key: Ed25519PrivateKey, keyid: str
) -> tuple[dict[str, Any], bytes]:
    """The envelope of ``signed`` and its JSON bytes, serialised once.

    ``keyid`` must be :func:`key_id` of ``private_key`` (a caller signing thousands of states keeps
    it instead of hashing the public key per signature). The bytes reuse the canonical JSON the
    signature covers, so the bulk signer encodes each DesiredState once, not twice.
    """
    if not _HEX.fullmatch(keyid):  # it goes into the bytes as is
        raise ValueError(f"key id {keyid!r} is not hex")
    message = canonical_json(signed)
    sig = base64.b64encode(private_key.sign(message))
    data = b'{"signed":%s,"signatures":[{"keyid":"%s","sig":"%s"}]}' % (message, keyid.encode(), sig)
    return {"signed": signed, "signatures": [{"keyid": keyid, "sig": sig.decode("ascii")}]}, data


def verify_envelope(envelope: Any, trusted_keys: list[Ed25519PublicKey]) -> dict[str, Any]:
    """Return the ``signed`` dict of ``envelope`` if one of ``trusted_keys`` signed it.

    Raises :class:`InvalidPayload` for a malformed envelope and :class:`SignatureError` when no
    trusted key produced a valid signature.
    """
    if not isinstance(envelope, dict):
        raise InvalidPayload("envelope is not a JSON object")
    signed = envelope.get("signed")
    signatures = envelope.get("signatures")
    if not isinstance(signed, dict) or not isinstance(signatures, list):
        raise InvalidPayload("envelope needs a 'signed' object and a 'signatures' list")
    if not signatures:
        raise SignatureError("envelope is unsigned")
    by_id = {key_id(k): k for k in trusted_keys}
    try:
        message = canonical_json(signed)
    except UnicodeError as exc:  # a lone surrogate (valid JSON escape, not encodable as UTF-8)
        raise InvalidPayload(f"signed part is not encodable as UTF-8: {exc}") from None
    for entry in signatures:
        if not isinstance(entry, dict):
            continue
        key = by_id.get(str(entry.get("keyid", "")))
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(str(entry.get("sig", "")), validate=True), message)
        except (InvalidSignature, ValueError):
            raise SignatureError("signature does not verify") from None
        return signed
    raise SignatureError("no signature by a trusted key")
