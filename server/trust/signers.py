"""Which keys sign each role of the image repository.

One Ed25519 key file per role in ``key_dir``; root and targets keys may be kept offline and lent
for one operation (:meth:`RoleSigners.using_keys`). A key is used only if the root names it for its
role. During a key rotation a role is signed by a list of signers (old and new key) instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from server.trust.keys import load_private_key
from server.trust.storage import RepositoryError, RepositoryStore

ROLE_KEY_FILES: dict[str, str] = {
    Root.type: "tuf-root.key",
    Targets.type: "tuf-targets.key",
    Snapshot.type: "tuf-snapshot.key",
    Timestamp.type: "tuf-timestamp.key",
}


class SigningKeyUnavailable(RepositoryError):
    """The key of a role is not on this host (kept offline) or does not match root."""


def as_signer(key: Signer | Ed25519PrivateKey) -> Signer:
    """A securesystemslib signer for ``key`` (an Ed25519 private key or already a signer)."""
    if isinstance(key, Signer):
        return key
    return CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))


class RoleSigners(RepositoryStore):
    """The repository's files plus the keys that sign them (``key_dir``, lent, in transition)."""

    def __init__(self, repo_dir: Path, key_dir: Path) -> None:
        super().__init__(repo_dir)
        self.key_dir = Path(key_dir)
        #: keys lent for one operation (:meth:`using_keys`): offline keys, by role
        self._lent: dict[str, Signer] = {}
        #: per-role signer lists that override the single key while a rotation re-signs a role
        self._transition: dict[str, list[Signer]] = {}

    def _key_path(self, role: str) -> Path:
        return self.key_dir / ROLE_KEY_FILES[role]

    def _signer(self, role: str, root: Root) -> Signer:
        """The signer of ``role``; :class:`SigningKeyUnavailable` if its key is absent or unknown."""
        lent = self._lent.get(role)
        if lent is not None:
            if lent.public_key.keyid not in root.roles[role].keyids:
                raise SigningKeyUnavailable(f"the {role} key given is not a {role} key of the current root")
            return lent
        path = self._key_path(role)
        if not path.exists():
            raise SigningKeyUnavailable(f"the {role} key ({path}) is not on this host")
        private = load_private_key(path)
        public = SSlibKey.from_crypto(private.public_key())
        if public.keyid not in root.roles[role].keyids:
            raise SigningKeyUnavailable(f"{path} is not a {role} key of the current root")
        return CryptoSigner(private, public)

    def _sign(self, md: Metadata[Any], root: Root) -> None:
        """Replace the signatures of ``md`` with its role's: the rotation's signers, else the key."""
        role = md.signed.type
        signers = self._transition.get(role) or [self._signer(role, root)]
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def has_key(self, role: str) -> bool:
        """Whether the key of ``role`` is on this host (or lent with :meth:`using_keys`)."""
        return role in self._lent or self._key_path(role).exists()

    @contextmanager
    def using_keys(self, keys: Mapping[str, Signer | Ed25519PrivateKey]) -> Iterator[None]:
        """Sign with these keys (by role) instead of the files in ``key_dir`` inside the block.

        For keys kept offline: ``with repo.using_keys({"targets": key}): repo.add_target(...)``.
        Holds the repository lock for the whole block, so no other thread signs with them.
        """
        with self._locked():
            saved = self._lent
            self._lent = {**saved, **{role: as_signer(key) for role, key in keys.items()}}
            try:
                yield
            finally:
                self._lent = saved
