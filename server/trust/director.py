"""The director: the server's online key that signs each device's DesiredState."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from device_client.protocol.messages import DesiredState
from device_client.protocol.signing import key_id, public_key_to_pem, sign_envelope
from server.trust.keys import load_or_create_ed25519

DIRECTOR_KEY_FILE = "director.key"


class Director:
    def __init__(self, key_dir: Path) -> None:
        self.key = load_or_create_ed25519(key_dir / DIRECTOR_KEY_FILE)

    @property
    def public_key_pem(self) -> str:
        return public_key_to_pem(self.key.public_key())

    @property
    def key_id(self) -> str:
        return key_id(self.key.public_key())

    def sign(self, desired: DesiredState) -> dict[str, Any]:
        """The signed envelope of ``desired``, ready to publish as JSON."""
        return sign_envelope(desired.to_dict(), self.key)
