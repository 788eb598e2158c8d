"""The TUF image repository (python-tuf ``tuf.api.metadata``): root, targets, snapshot, timestamp.

:class:`ImageRepository` publishes and revokes targets, rotates role keys and re-signs expiring
metadata. It is built in layers, one module each: storage (files and lock), signers (role keys),
publish (new versions, on ``tuf.repository.Repository``), staging (offline targets signing). This
module is the public API and re-exports their names. Layout, rotation and crash safety:
docs/architecture.md, "Image repository (TUF)".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import Key, Signer
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp

from server.trust.publish import expiry_from, needs_refresh
from server.trust.signers import ROLE_KEY_FILES, SigningKeyUnavailable, as_signer
from server.trust.staging import SignatureRejected, StagingError, TargetsStaging, sign_staged_targets
from server.trust.storage import (
    LOCK_FILE,
    STAGED_TARGETS,
    InvalidTargetPath,
    RepositoryError,
    check_target_path,
    consistent_target_name,
)

__all__ = [
    "LOCK_FILE",
    "ROLE_KEY_FILES",
    "STAGED_TARGETS",
    "ImageRepository",
    "InvalidTargetPath",
    "RepositoryError",
    "SignatureRejected",
    "SigningKeyUnavailable",
    "StagingError",
    "TargetExists",
    "as_signer",
    "check_target_path",
    "consistent_target_name",
    "sign_staged_targets",
]

log = logging.getLogger(__name__)


class TargetExists(RepositoryError):
    """The target path is already listed with different content."""


class ImageRepository(TargetsStaging):
    """A TUF repository on the local file system; layout: docs/architecture.md.

    The constructor (directories, role lifetimes, a clock for tests) is that of
    :class:`server.trust.publish.Publisher`.
    """

    # -- targets -----------------------------------------------------------------------------
    def add_target(
        self, target_path: str, local_file: Path, custom: dict[str, Any], *, replace: bool = False
    ) -> TargetFile:
        """Publish ``local_file`` as ``target_path`` with ``custom`` fields; return its TargetFile.

        Re-adding identical content and custom fields is a no-op. A different target already at
        ``target_path`` raises :class:`TargetExists` unless ``replace`` (the old file is deleted).
        """
        info, dest = self._describe_target(target_path, local_file, custom)
        with self._locked():
            root = self._root().signed
            self._signer(Targets.type, root)  # fail before copying anything if the key is offline
            targets = self._working_targets()
            old = targets.signed.targets.get(target_path)
            if old is not None and old == info and dest.exists():
                return old
            if old is not None and not replace:
                raise TargetExists(f"target {target_path!r} is already published with other content")
            self._copy_target(local_file, dest)
            targets.signed.targets[target_path] = info
            self._publish(root, self._clock(), targets)
            if old is not None and old.hashes != info.hashes:
                self._delete_target_file(old)
            log.info("published target %s (%d bytes)", target_path, info.length)
            return info

    def remove_target(self, target_path: str, *, delete_file: bool = True) -> TargetFile | None:
        """Revoke ``target_path``: drop it from targets metadata, then (by default) delete its file.

        Returns the removed TargetFile, or None (and writes nothing) if the path was not listed.
        With ``delete_file=False`` the file stays, so that :meth:`restore_target` can re-list it
        (a revocation whose transaction rolled back) or :meth:`purge_target_file` delete it later.
        """
        check_target_path(target_path)
        with self._locked():
            root = self._root().signed
            targets = self._working_targets()
            info = targets.signed.targets.pop(target_path, None)
            if info is None:
                return None
            self._publish(root, self._clock(), targets)
            if delete_file:
                self._delete_target_file(info)
            log.info("removed target %s", target_path)
            return info

    def restore_target(self, info: TargetFile) -> None:
        """Re-list a target removed with ``delete_file=False`` whose file is still stored."""
        check_target_path(info.path)
        stored = self._stored(info)
        with self._locked():
            if not stored.is_file() or stored.stat().st_size != info.length:
                raise RepositoryError(f"cannot restore {info.path}: its stored file is gone or changed")
            root = self._root().signed
            self._signer(Targets.type, root)
            targets = self._working_targets()
            if targets.signed.targets.get(info.path) == info:
                return
            targets.signed.targets[info.path] = info
            self._publish(root, self._clock(), targets)
            log.info("restored target %s", info.path)

    def purge_target_file(self, info: TargetFile) -> bool:
        """Delete the stored file of a removed target, unless that exact target is listed again."""
        with self._locked():
            staged = self.staged_targets()
            in_staged = staged.signed.targets.get(info.path) if staged is not None else None
            for listed in (self.get_target(info.path), in_staged):
                if listed is not None and listed.hashes == info.hashes:
                    return False
            stored = self._stored(info)
            if not stored.exists():
                return False
            stored.unlink()
            return True

    # -- expiry ------------------------------------------------------------------------------
    def refresh_expiring(self, now: datetime | None = None) -> list[str]:
        """Re-sign every role with less than half its lifetime left (and the roles above it).

        Root and targets are only re-signed when their key is on this host. Returns the names of
        the roles written, e.g. ``["timestamp"]``; empty when nothing was due.
        """
        with self._locked():
            now = now or self._clock()
            written: list[str] = []
            root_md = self._root()
            if needs_refresh(root_md.signed, self.lifetimes[Root.type], now):
                if self.has_key(Root.type):
                    with self._publishing(root_md.signed, now):
                        self.close(Root.type, root_md)
                    written.append(Root.type)
                else:
                    log.warning(
                        "root metadata expires at %s; sign a new root offline", root_md.signed.expires
                    )
            root = root_md.signed
            timestamp = self._timestamp().signed
            snapshot = self._snapshot(timestamp).signed
            targets_md: Metadata[Targets] | None = None
            targets = self._targets(snapshot)
            staged = self.staged_path.exists()
            if staged or needs_refresh(targets.signed, self.lifetimes[Targets.type], now):
                if self.has_key(Targets.type):
                    targets_md = self._working_targets()  # staged changes go out with it
                elif not staged:
                    self.stage_renewal()
                    log.warning(
                        "targets metadata expires at %s; a renewal is staged: sign it with "
                        "`fleet model sign` on the targets key's workstation",
                        targets.signed.expires,
                    )
            snapshot_due = needs_refresh(snapshot, self.lifetimes[Snapshot.type], now)
            timestamp_due = needs_refresh(timestamp, self.lifetimes[Timestamp.type], now)
            if targets_md is not None or snapshot_due or timestamp_due:
                written += self._publish(root, now, targets_md, force_snapshot=snapshot_due)
            return written

    # -- key rotation ------------------------------------------------------------------------
    def _next_root(self, current: Metadata[Root], now: datetime, role: str, key: Key) -> Metadata[Root]:
        """Root N+1, unsigned and with a new expiry, naming ``key`` as the only key of ``role``."""
        if key.keyid in current.signed.roles[role].keyids:
            raise ValueError(f"the new {role} key is already a {role} key of the current root")
        nxt = Metadata[Root].from_bytes(current.to_bytes())
        nxt.signatures.clear()
        nxt.signed.version += 1
        nxt.signed.expires = expiry_from(now, self.lifetimes[Root.type])
        for keyid in list(nxt.signed.roles[role].keyids):
            nxt.signed.revoke_key(keyid, role)
        nxt.signed.add_key(key, role)
        return nxt

    def rotate_root(
        self,
        new_key: Signer | Ed25519PrivateKey,
        old_keys: Sequence[Signer | Ed25519PrivateKey] = (),
        *,
        on_committed: Callable[[], None] | None = None,
    ) -> int:
        """Replace the root key: write ``N+1.root.json`` signed by the old root keys and the new one.

        ``old_keys`` default to the root key in ``key_dir`` (or lent by :meth:`using_keys`). The
        new root must verify both under root N (threshold of the old keys, so clients walk to it)
        and under itself, as the TUF specification requires. ``on_committed`` runs under the
        repository lock right after the new root is written (the caller swaps the key files).
        Returns the new root version.
        """
        new_signer = as_signer(new_key)
        with self._locked():
            now = self._clock()
            current = self._root()
            old_signers = [as_signer(k) for k in old_keys] or [self._signer(Root.type, current.signed)]
            nxt = self._next_root(current, now, Root.type, new_signer.public_key)
            for signer in (*old_signers, new_signer):
                nxt.sign(signer, append=True)
            try:
                current.verify_delegate(Root.type, nxt)
                nxt.verify_delegate(Root.type, nxt)
            except Exception as exc:  # tuf raises UnsignedMetadataError; anything else is as bad
                raise SigningKeyUnavailable(f"the new root does not verify: {exc}") from None
            self._write_signed_root(nxt)
            if on_committed is not None:
                on_committed()
            log.info("rotated the root key: root v%d", nxt.signed.version)
            return nxt.signed.version

    def rotate_role(
        self,
        role: str,
        new_key: Signer | Ed25519PrivateKey,
        *,
        on_committed: Callable[[], None] | None = None,
    ) -> int:
        """Replace the key of ``targets``, ``snapshot`` or ``timestamp``; return the new root version.

        Needs the root key (``key_dir`` or :meth:`using_keys`). Order, so that every reader always
        finds metadata that verifies under the root it holds:

        1. the role (and the roles above it: targets -> snapshot -> timestamp) is re-published
           with new versions, signed by the new key and, when it is here, the old key too;
        2. ``N+1.root.json`` names the new key instead of the old one (signed by root);
        3. ``on_committed`` (the caller swaps the key files), under the repository lock.

        From then on only the new key signs; metadata signed by the old key alone is refused by
        every client that has root N+1.
        """
        if role not in (Targets.type, Snapshot.type, Timestamp.type):
            raise ValueError(f"rotate_role rotates targets, snapshot or timestamp, not {role!r}")
        new_signer = as_signer(new_key)
        with self._locked():
            now = self._clock()
            current = self._root()
            root_signer = self._signer(Root.type, current.signed)
            nxt = self._next_root(current, now, role, new_signer.public_key)
            nxt.sign(root_signer)
            current.verify_delegate(Root.type, nxt)
            nxt.verify_delegate(Root.type, nxt)
            signers: list[Signer] = [new_signer]
            try:
                signers.insert(0, self._signer(role, current.signed))
            except SigningKeyUnavailable:
                log.warning("the old %s key is not here: %s is signed by the new key only", role, role)
            self._transition = {role: signers}
            try:
                targets = self._targets() if role == Targets.type else None
                # staged changes stay staged (renumbered on their next read): a rotation only
                # re-signs what is published
                self._publish(
                    nxt.signed, now, targets, force_snapshot=role != Timestamp.type, keep_stage=True
                )
            finally:
                self._transition = {}
            self._write_signed_root(nxt)
            if on_committed is not None:
                on_committed()
            log.info("rotated the %s key: root v%d", role, nxt.signed.version)
            return nxt.signed.version
