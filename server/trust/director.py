"""The director: the server's online key that signs each device's DesiredState.

The key file is re-read when it is replaced (``fleet keys rotate director`` runs in another
process and renames a new key over ``director.key``), so a running server switches to the new key
on its next signature without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_client.protocol.messages import DesiredState
from device_client.protocol.signing import key_id, public_key_to_pem, sign_envelope
from server.trust.keys import load_or_create_ed25519

log = logging.getLogger(__name__)

DIRECTOR_KEY_FILE = "director.key"


class Director:
    def __init__(self, key_dir: Path) -> None:
        self.path = Path(key_dir) / DIRECTOR_KEY_FILE
        self._lock = threading.Lock()
        self._key = load_or_create_ed25519(self.path)
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    @property
    def key(self) -> Ed25519PrivateKey:
        """The current director key, reloaded if ``director.key`` was replaced since last use."""
        with self._lock:
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                try:
                    key = load_or_create_ed25519(self.path)
                except (OSError, ValueError) as exc:
                    log.error("cannot reload %s, still signing with key %s: %s", self.path, self._kid(), exc)
                else:
                    self._key, self._stamp = key, stamp
                    log.warning("director key replaced on disk: now signing with %s", self._kid())
            return self._key

    def _kid(self) -> str:
        return key_id(self._key.public_key())[:16]

    @property
    def public_key_pem(self) -> str:
        return public_key_to_pem(self.key.public_key())

    @property
    def key_id(self) -> str:
        return key_id(self.key.public_key())

    def sign(self, desired: DesiredState) -> dict[str, Any]:
        """The signed envelope of ``desired``, ready to publish as JSON."""
        return sign_envelope(desired.to_dict(), self.key)
