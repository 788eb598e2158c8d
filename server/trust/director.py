"""The director: the server's online key that signs each device's DesiredState.

The key file is re-read when it is replaced, so a running server switches to a rotated key without
a restart. Signing does not look at the file each time (a ``stat`` per signature cost ~8% of bulk
signing): a rotation in this process (:mod:`server.trust.rotation` calls :func:`key_replaced`) is
picked up on the next signature, and one made by another process (``fleet keys rotate director``
from the CLI, another replica sharing the key directory), which renames a new key over
``director.key``, within :data:`CHECK_INTERVAL_S`: the file is checked at most that often.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_client.protocol.messages import DesiredState
from device_client.protocol.signing import key_id, public_key_to_pem, sign_envelope_json
from server.trust.keys import load_or_create_ed25519

log = logging.getLogger(__name__)

DIRECTOR_KEY_FILE = "director.key"
#: at most this often (seconds) a director checks whether ``director.key`` was replaced on disk
CHECK_INTERVAL_S = 1.0

#: bumped by :func:`key_replaced`; a director whose last check saw another value checks again at once
_generation = 0
_generation_lock = threading.Lock()


def key_replaced() -> None:
    """A director key file was replaced by this process: every :class:`Director` in it re-reads
    its file on its next signature instead of at its next timed check."""
    global _generation
    with _generation_lock:
        _generation += 1


class Director:
    def __init__(
        self,
        key_dir: Path,
        *,
        check_interval_s: float = CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(key_dir) / DIRECTOR_KEY_FILE
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._generation = _generation
        key = load_or_create_ed25519(self.path)
        #: (key, key id), replaced as one reference so a signer never pairs a key with another's id
        self._signing = (key, key_id(key.public_key()))
        self._stamp = self._file_stamp()
        self._next_check = clock() + check_interval_s

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    @property
    def key(self) -> Ed25519PrivateKey:
        """The current director key, reloaded if ``director.key`` was replaced: checked when this
        process replaced a key file since the last check, else at most every ``check_interval_s``."""
        return self._current()[0]

    def _current(self) -> tuple[Ed25519PrivateKey, str]:
        """(key, key id), reloaded as :attr:`key` says; the two always belong together."""
        if _generation == self._generation and self._clock() < self._next_check:
            return self._signing
        with self._lock:
            self._generation = _generation  # read before the stat: a later bump checks again
            self._next_check = self._clock() + self.check_interval_s
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                try:
                    key = load_or_create_ed25519(self.path)
                except (OSError, ValueError) as exc:
                    log.error("cannot reload %s, still signing with key %s: %s", self.path, self._kid(), exc)
                else:
                    self._signing, self._stamp = (key, key_id(key.public_key())), stamp
                    log.warning("director key replaced on disk: now signing with %s", self._kid())
            return self._signing

    def _kid(self) -> str:
        return self._signing[1][:16]

    @property
    def public_key_pem(self) -> str:
        return public_key_to_pem(self.key.public_key())

    @property
    def key_id(self) -> str:
        return self._current()[1]

    def sign(self, desired: DesiredState) -> dict[str, Any]:
        """The signed envelope of ``desired``, ready to publish as JSON."""
        return self.sign_json(desired)[0]

    def sign_json(self, desired: DesiredState) -> tuple[dict[str, Any], bytes]:
        """The signed envelope of ``desired`` and the JSON bytes to publish (serialised once)."""
        key, keyid = self._current()
        return sign_envelope_json(desired.to_dict(), key, keyid)
