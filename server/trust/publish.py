"""Publishing new metadata versions, built on python-tuf's ``tuf.repository.Repository``.

:meth:`Publisher.close` numbers, dates, signs and writes the next version of a role; the base
class's ``do_snapshot``/``do_timestamp`` derive snapshot and timestamp from what was written. A
publish writes targets, then snapshot, then timestamp, so a reader never sees a half-published
state. Offline-signed targets and key rotations write around ``close`` (see docs/architecture.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import SSlibKey
from tuf.api.metadata import (
    TOP_LEVEL_ROLE_NAMES,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    Targets,
    Timestamp,
)
from tuf.repository import Repository

from server.trust.keys import load_or_create_ed25519
from server.trust.signers import RoleSigners
from server.trust.storage import TIMESTAMP_FILE, RepositoryError

log = logging.getLogger(__name__)

#: the first version of each role is built from these (version 0 until close() numbers it)
_NEW_ROLE: dict[str, Callable[[], Signed]] = {
    Root.type: lambda: Root(consistent_snapshot=True),
    Targets.type: Targets,
    Snapshot.type: Snapshot,
    Timestamp.type: Timestamp,
}


def _utcnow() -> datetime:
    return datetime.now(UTC)


def expiry_from(now: datetime, lifetime: timedelta) -> datetime:
    """``now + lifetime`` in whole seconds (what TUF metadata carries)."""
    return (now + lifetime).replace(microsecond=0)


def needs_refresh(signed: Signed, lifetime: timedelta, now: datetime) -> bool:
    """True when less than half of the role's lifetime is left before it expires."""
    return signed.expires - now < lifetime / 2


@dataclass
class _Publication:
    """One publish in progress: the root its versions are signed under, the time they are dated,
    and the targets and snapshot versions written so far (for do_snapshot and do_timestamp)."""

    root: Root
    now: datetime
    targets: MetaFile | None = None
    snapshot: MetaFile | None = None


class Publisher(RoleSigners, Repository):
    """Writes new versions of the top-level roles: the ``Repository`` that python-tuf expects.

    ``clock`` is only there so that tests can move time; everything else uses UTC now.
    """

    def __init__(
        self,
        repo_dir: Path,
        key_dir: Path,
        *,
        root_expiry_s: int = 365 * 86400,
        targets_expiry_s: int = 90 * 86400,
        snapshot_expiry_s: int = 7 * 86400,
        timestamp_expiry_s: int = 86400,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        super().__init__(repo_dir, key_dir)
        self.lifetimes: dict[str, timedelta] = {
            Root.type: timedelta(seconds=root_expiry_s),
            Targets.type: timedelta(seconds=targets_expiry_s),
            Snapshot.type: timedelta(seconds=snapshot_expiry_s),
            Timestamp.type: timedelta(seconds=timestamp_expiry_s),
        }
        for role, lifetime in self.lifetimes.items():
            if lifetime <= timedelta(0):
                raise ValueError(f"{role} expiry must be positive")
        self._clock = clock
        self._publication: _Publication | None = None

    # -- tuf.repository.Repository -----------------------------------------------------------
    def open(self, role: str) -> Metadata[Any]:
        """The current metadata of ``role``, or a version-0 one to fill when there is none yet
        (root before :meth:`initialize`, the other roles before the first publish)."""
        if role not in _NEW_ROLE:
            raise RepositoryError(f"no role {role!r}: the repository has no delegated roles")
        if role == Root.type and self._root_versions():
            return self._root()
        if role != Root.type and (self.metadata_dir / TIMESTAMP_FILE).exists():
            if role == Targets.type:
                return self._targets()
            return self._snapshot() if role == Snapshot.type else self._timestamp()
        md: Metadata[Any] = Metadata(_NEW_ROLE[role]())
        md.signed.version = 0
        return md

    def close(self, role: str, md: Metadata[Any]) -> None:
        """Write ``md`` as the next version of ``role``, dated and signed for the publication in
        progress (:meth:`_publishing`), and note it for ``do_snapshot``/``do_timestamp``."""
        publication = self._publication
        if publication is None:
            raise RepositoryError("metadata is written only by a publish (Publisher._publishing)")
        md.signed.version += 1
        md.signed.expires = expiry_from(publication.now, self.lifetimes[role])
        self._sign(md, md.signed if role == Root.type else publication.root)
        if role == Root.type:
            self._write_signed_root(md)
        elif role == Timestamp.type:
            self._write(TIMESTAMP_FILE, md)
        else:
            self._write(f"{md.signed.version}.{role}.json", md)
            written = MetaFile(version=md.signed.version)
            if role == Targets.type:
                publication.targets = written
            else:
                publication.snapshot = written

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        """The targets version a new snapshot lists: the one just written, else the current one."""
        written = self._publication.targets if self._publication else None
        return {"targets.json": written or self.open(Snapshot.type).signed.meta["targets.json"]}

    @property
    def snapshot_info(self) -> MetaFile:
        """The snapshot version a new timestamp names: the one just written, else the current one."""
        written = self._publication.snapshot if self._publication else None
        return written or self.open(Timestamp.type).signed.snapshot_meta

    # -- publishing --------------------------------------------------------------------------
    @contextmanager
    def _publishing(self, root: Root, now: datetime) -> Iterator[_Publication]:
        """Hold the lock while new versions signed under ``root`` and dated ``now`` are written."""
        with self._locked():
            saved, self._publication = self._publication, _Publication(root, now)
            try:
                yield self._publication
            finally:
                self._publication = saved

    def _publish(
        self,
        root: Root,
        now: datetime,
        targets: Metadata[Targets] | None,
        force_snapshot: bool = True,
        *,
        presigned: bool = False,
        keep_stage: bool = False,
    ) -> list[str]:
        """Write new targets (if given), snapshot (if forced or targets changed) and timestamp.

        Targets are given the next version and a new expiry and signed here, unless ``presigned``
        (an offline signature: written as it came). Callers publish the staged targets when there
        are any, so the stage is dropped once targets are out, unless ``keep_stage`` (a key
        rotation re-publishes the current targets only). Returns the roles written.
        """
        written: list[str] = []
        with self._publishing(root, now) as publication:
            if targets is not None:
                if presigned:  # signed elsewhere (an offline targets key): written as it came
                    self._write(f"{targets.signed.version}.targets.json", targets)
                    publication.targets = MetaFile(version=targets.signed.version)
                else:
                    # numbered after the current version (staged targets already carry the next)
                    targets.signed.version = self._targets_version()
                    self.close(Targets.type, targets)
                written.append(Targets.type)
            if self.do_snapshot(force=force_snapshot)[0]:
                written.append(Snapshot.type)
            self.do_timestamp(force=True)
            written.append(Timestamp.type)
        if targets is not None and not keep_stage:
            self.staged_path.unlink(missing_ok=True)  # published: whatever was staged is in it
        return written

    def initialize(self) -> None:
        """Create keys and version-1 metadata on first use; otherwise check what is there.

        Idempotent, and completes an initialisation that crashed half-way.
        """
        with self._locked():
            self.metadata_dir.mkdir(parents=True, exist_ok=True)
            self.targets_dir.mkdir(parents=True, exist_ok=True)
            self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            now = self._clock()
            if not self._root_versions():
                new_root = self.open(Root.type)
                for role in sorted(TOP_LEVEL_ROLE_NAMES):
                    key = load_or_create_ed25519(self._key_path(role))
                    new_root.signed.add_key(SSlibKey.from_crypto(key.public_key()), role)
                with self._publishing(new_root.signed, now):
                    self.close(Root.type, new_root)
                log.info("created TUF root v1 in %s", self.metadata_dir)
            root = self._root().signed
            if not root.consistent_snapshot:
                raise RepositoryError("the repository's root does not use consistent snapshots")
            for role in TOP_LEVEL_ROLE_NAMES:
                if self.has_key(role):
                    self._signer(role, root)  # raises if the key does not belong to the root
            if not (self.metadata_dir / TIMESTAMP_FILE).exists():
                with self._publishing(root, now):
                    self.close(Targets.type, self.open(Targets.type))
                    self.do_snapshot()
                    self.do_timestamp()
                log.info("created TUF targets/snapshot/timestamp v1 in %s", self.metadata_dir)
