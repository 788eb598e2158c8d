"""The director key list: a TUF target that tells devices which director keys to trust.

Published as :data:`DIRECTOR_KEYS_TARGET` and trusted through root -> targets, never through the
director key itself, so the director key rotates without re-enrolling a device. ``keys[0]`` is the
signing key, the others stay trusted during a rotation, and ``version`` only grows (the document
format: docs/architecture.md, "Director").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import InvalidPayload, SignatureError
from .signing import key_id, public_key_from_pem, public_key_to_pem

DIRECTOR_KEYS_TARGET = "_fleet/director-keys.json"
DIRECTOR_KEYS_SCHEMA = "fleetota.director-keys/1"
#: the target's custom fields, so that nothing mistakes it for a model bundle
DIRECTOR_KEYS_CUSTOM = {"fleetota": "director-keys"}
MAX_DIRECTOR_KEYS = 16
MAX_DIRECTOR_KEYS_BYTES = 64 * 1024


@dataclass(frozen=True)
class DirectorKeyList:
    version: int
    keys: tuple[Ed25519PublicKey, ...]

    @property
    def keyids(self) -> list[str]:
        return [key_id(k) for k in self.keys]

    @property
    def primary(self) -> str:
        """The keyid the director signs with now."""
        return key_id(self.keys[0])

    def to_bytes(self) -> bytes:
        doc = {
            "schema": DIRECTOR_KEYS_SCHEMA,
            "version": self.version,
            "keys": [{"keyid": key_id(k), "public_key_pem": public_key_to_pem(k)} for k in self.keys],
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()


def parse_director_keys(data: bytes) -> DirectorKeyList:
    """A validated :class:`DirectorKeyList`; :class:`InvalidPayload` if ``data`` is not one."""
    if len(data) > MAX_DIRECTOR_KEYS_BYTES:
        raise InvalidPayload(f"director key list of {len(data)} bytes exceeds {MAX_DIRECTOR_KEYS_BYTES}")
    try:
        doc: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidPayload(f"director key list is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != DIRECTOR_KEYS_SCHEMA:
        raise InvalidPayload(f"not a {DIRECTOR_KEYS_SCHEMA} document")
    version, entries = doc.get("version"), doc.get("keys")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidPayload("director key list needs a positive integer version")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_DIRECTOR_KEYS:
        raise InvalidPayload(f"director key list needs 1..{MAX_DIRECTOR_KEYS} keys")
    keys: list[Ed25519PublicKey] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("public_key_pem"), str):
            raise InvalidPayload("every director key needs a public_key_pem")
        try:
            key = public_key_from_pem(entry["public_key_pem"])
        except SignatureError as exc:
            raise InvalidPayload(str(exc)) from None
        if entry.get("keyid") != key_id(key):
            raise InvalidPayload("a director keyid does not match its public key")
        if key_id(key) in (key_id(k) for k in keys):
            raise InvalidPayload("a director key is listed twice")
        keys.append(key)
    return DirectorKeyList(version=version, keys=tuple(keys))
