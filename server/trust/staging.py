"""Offline targets signing: changes staged for a targets key kept on a workstation.

Without the targets key here, new and removed targets go into ``staged/targets.json`` (unsigned,
never served), always numbered as the next targets version. ``fleet model sign`` signs it on the
signer's workstation (:func:`sign_staged_targets`); :meth:`TargetsStaging.publish_signed_targets`
checks what comes back against the stage and publishes it with new snapshot and timestamp.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from server.trust.keys import atomic_write
from server.trust.publish import Publisher, expiry_from, needs_refresh
from server.trust.signers import as_signer
from server.trust.storage import RepositoryError, check_target_path

log = logging.getLogger(__name__)

#: how far beyond the targets lifetime an offline signer may date ``expires`` (clock skew)
_EXPIRY_SLACK = timedelta(hours=1)


class StagingError(RepositoryError):
    """Nothing is staged for an offline signature, or what came back is not what is staged."""


class SignatureRejected(RepositoryError, ValueError):
    """Offline-signed metadata that does not verify (or is malformed or wrongly dated)."""


def sign_staged_targets(
    staged: Mapping[str, Any], key: Signer | Ed25519PrivateKey, expires: datetime
) -> bytes:
    """Date and sign staged targets metadata with an offline targets key (``fleet model sign`` on
    the signer's workstation); the bytes go back to :meth:`ImageRepository.publish_signed_targets`."""
    md = Metadata[Targets].from_dict(copy.deepcopy(dict(staged)))
    if not isinstance(md.signed, Targets):
        raise SignatureRejected(f"expected targets metadata, got {md.signed.type}")
    md.signed.expires = expires.astimezone(UTC).replace(microsecond=0)
    md.signatures.clear()
    md.sign(as_signer(key))
    return md.to_bytes(JSONSerializer(compact=False))


class TargetsStaging(Publisher):
    """The staged targets metadata of a repository whose targets key may be offline."""

    def staged_targets(self) -> Metadata[Targets] | None:
        """The targets metadata staged for an offline signature (unsigned), or None.

        Its version is always the current targets version + 1: a publish or rotation that moved
        the current version since it was staged re-numbers it here (under the lock).
        """
        with self._locked():
            try:
                md = Metadata[Targets].from_bytes(self.staged_path.read_bytes())
            except FileNotFoundError:
                return None
            if md.signed.version != self._targets_version() + 1:
                self._stage(md)
            return md

    def _working_targets(self) -> Metadata[Targets]:
        """What the next targets version starts from: the staged one if any, else the current."""
        return self.staged_targets() or self._targets()

    def _stage(self, md: Metadata[Targets]) -> None:
        """Write ``md`` as the staged targets: the next version, a fresh expiry, no signatures."""
        md.signed.version = self._targets_version() + 1
        md.signed.expires = expiry_from(self._clock(), self.lifetimes[Targets.type])
        md.signatures.clear()
        self.staged_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.staged_path, md.to_bytes(self._serializer))

    def stage_target(
        self, target_path: str, local_file: Path, custom: dict[str, Any]
    ) -> tuple[TargetFile, TargetFile | None]:
        """Store ``local_file`` and stage it as ``target_path`` for an offline targets signature.

        For when the targets key is not here: the bundle is stored under its content-addressed
        name (downloadable by admins, so the signer can check it, but listed nowhere a device
        trusts) and the staged targets metadata lists it. Returns the new TargetFile and the one
        it replaced in the staged metadata (for :meth:`unstage`).
        """
        info, dest = self._describe_target(target_path, local_file, custom)
        with self._locked():
            base = self._working_targets()
            old = base.signed.targets.get(target_path)
            if not (old == info and dest.exists()):
                self._copy_target(local_file, dest)
            base.signed.targets[target_path] = info
            self._stage(base)
            log.info("staged target %s (%d bytes) for an offline targets signature", target_path, info.length)
            return info, old

    def stage_removal(self, target_path: str) -> TargetFile | None:
        """Stage the removal of ``target_path`` (a revocation without the targets key).

        The target stays listed in the signed metadata until the staged version is signed.
        Returns what was removed from the staged metadata, or None if it was not there.
        """
        check_target_path(target_path)
        with self._locked():
            base = self._working_targets()
            info = base.signed.targets.pop(target_path, None)
            if info is not None:
                self._stage_or_drop(base)  # nothing left to sign when it was only staged
                log.info("staged the removal of target %s", target_path)
            return info

    def unstage(self, target_path: str, previous: TargetFile | None) -> None:
        """Undo a staged change of ``target_path`` (its transaction rolled back): the staged entry
        goes back to ``previous`` (None: not listed). Nothing left to sign drops the stage."""
        with self._locked():
            md = self.staged_targets()
            if md is None:
                return
            if previous is None:
                md.signed.targets.pop(target_path, None)
            else:
                md.signed.targets[target_path] = previous
            self._stage_or_drop(md)

    def _stage_or_drop(self, md: Metadata[Targets]) -> None:
        """:meth:`_stage` ``md``, or drop the stage when it would change nothing that is signed
        (same targets, and no renewal due)."""
        current = self._targets().signed
        renewal_due = needs_refresh(current, self.lifetimes[Targets.type], self._clock())
        if md.signed.targets == current.targets and not renewal_due:
            self.staged_path.unlink(missing_ok=True)
        else:
            self._stage(md)

    def stage_renewal(self) -> Metadata[Targets]:
        """Stage the current targets again with a fresh expiry (unless something is staged already),
        so that an offline targets key can renew them; returns the staged metadata."""
        with self._locked():
            md = self.staged_targets()
            if md is None:
                md = self._targets()
                self._stage(md)
            return md

    def staged_changes(
        self, staged: Metadata[Targets]
    ) -> tuple[dict[str, TargetFile], dict[str, TargetFile]]:
        """``(listed, unlisted)``: targets the staged metadata lists anew (or with other content)
        and targets it no longer lists, against the current targets metadata."""
        current = self._targets().signed.targets
        proposed = staged.signed.targets
        listed = {p: t for p, t in proposed.items() if current.get(p) != t}
        unlisted = {p: t for p, t in current.items() if p not in proposed}
        return listed, unlisted

    def publish_signed_targets(self, data: bytes) -> tuple[dict[str, TargetFile], dict[str, TargetFile]]:
        """Publish the staged targets metadata signed elsewhere; returns :meth:`staged_changes`.

        ``data`` must be the staged metadata, unchanged but for its ``expires`` (which the signer
        sets, within now .. now + the targets lifetime + 1 hour), carrying enough valid signatures
        of the current root's targets keys. Then new snapshot and timestamp versions are signed
        here (online keys) and the stage is dropped. :class:`StagingError` when nothing is staged
        or the metadata is not what is staged, :class:`SignatureRejected` when it does not verify.
        """
        try:
            md = Metadata[Targets].from_bytes(data)
        except Exception as exc:  # tuf raises DeserializationError; anything unparsable is as bad
            raise SignatureRejected(f"not a signed targets metadata file: {exc}") from None
        if not isinstance(md.signed, Targets):
            raise SignatureRejected(f"expected targets metadata, got {md.signed.type}")
        with self._locked():
            staged = self.staged_targets()
            if staged is None:
                raise StagingError("nothing is staged for signing")
            got, want = md.signed.to_dict(), staged.signed.to_dict()
            got.pop("expires"), want.pop("expires")
            if got != want:
                raise StagingError(
                    "the signed targets metadata is not what is staged (it changed since it was "
                    "fetched); fetch the staged metadata and sign it again"
                )
            now = self._clock()
            latest = now + self.lifetimes[Targets.type] + _EXPIRY_SLACK
            if not now < md.signed.expires <= latest:
                raise SignatureRejected(
                    f"expires {md.signed.expires.isoformat()} must lie between now and {latest.isoformat()}"
                )
            root_md = self._root()
            try:
                root_md.verify_delegate(Targets.type, md)
            except (UnsignedMetadataError, ValueError, KeyError) as exc:  # or a malformed signature
                raise SignatureRejected(
                    f"the targets metadata is not signed by the root's targets key: {exc}"
                ) from None
            changes = self.staged_changes(staged)
            self._publish(root_md.signed, now, md, presigned=True)
            log.info("published offline-signed targets v%d", md.signed.version)
            return changes
