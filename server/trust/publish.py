"""Publishing new metadata versions: targets, then snapshot, then timestamp, each atomically.

A reader never sees a half-published state: the current one is always read through the chain
timestamp -> snapshot -> targets, and timestamp.json is written last. Versions are numbered after
the current ones and dated from the publisher's clock; :meth:`Publisher.initialize` writes the
first ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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

from server.trust.keys import load_or_create_ed25519
from server.trust.signers import RoleSigners
from server.trust.storage import TIMESTAMP_FILE, RepositoryError

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def expiry_from(now: datetime, lifetime: timedelta) -> datetime:
    """``now + lifetime`` in whole seconds (what TUF metadata carries)."""
    return (now + lifetime).replace(microsecond=0)


def needs_refresh(signed: Signed, lifetime: timedelta, now: datetime) -> bool:
    """True when less than half of the role's lifetime is left before it expires."""
    return signed.expires - now < lifetime / 2


class Publisher(RoleSigners):
    """Writes new versions of the top-level roles.

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

    # -- publishing --------------------------------------------------------------------------
    def _sign_and_write(self, md: Metadata[Any], root: Root, name: str) -> None:
        self._sign(md, root)
        self._write(name, md)

    def _write_root(self, md: Metadata[Root]) -> None:
        md.sign(self._signer(Root.type, md.signed))
        self._write_signed_root(md)

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
        """Write new targets (if given), snapshot (if forced) and timestamp, in that order.

        Targets are given a new version and expiry and signed here, unless ``presigned`` (an
        offline signature: written as it came). Callers publish the staged targets when there
        are any, so the stage is dropped once targets are out, unless ``keep_stage`` (a key
        rotation re-publishes the current targets only). Returns the roles written.
        """
        written = []
        timestamp = self._timestamp()
        snapshot = self._snapshot(timestamp.signed)
        if targets is not None:
            if presigned:  # signed elsewhere (an offline targets key): written as it came
                self._write(f"{targets.signed.version}.targets.json", targets)
            else:
                targets.signed.version = snapshot.signed.meta["targets.json"].version + 1
                targets.signed.expires = expiry_from(now, self.lifetimes[Targets.type])
                self._sign_and_write(targets, root, f"{targets.signed.version}.targets.json")
            snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
            written.append(Targets.type)
        if targets is not None or force_snapshot:
            snapshot.signed.version += 1
            snapshot.signed.expires = expiry_from(now, self.lifetimes[Snapshot.type])
            self._sign_and_write(snapshot, root, f"{snapshot.signed.version}.snapshot.json")
            written.append(Snapshot.type)
        timestamp.signed.version += 1
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        timestamp.signed.expires = expiry_from(now, self.lifetimes[Timestamp.type])
        self._sign_and_write(timestamp, root, TIMESTAMP_FILE)
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
                new_root = Root(expires=expiry_from(now, self.lifetimes[Root.type]), consistent_snapshot=True)
                for role in sorted(TOP_LEVEL_ROLE_NAMES):
                    key = load_or_create_ed25519(self._key_path(role))
                    new_root.add_key(SSlibKey.from_crypto(key.public_key()), role)
                self._write_root(Metadata(new_root))
                log.info("created TUF root v1 in %s", self.metadata_dir)
            root = self._root().signed
            if not root.consistent_snapshot:
                raise RepositoryError("the repository's root does not use consistent snapshots")
            for role in TOP_LEVEL_ROLE_NAMES:
                if self.has_key(role):
                    self._signer(role, root)  # raises if the key does not belong to the root
            if not (self.metadata_dir / TIMESTAMP_FILE).exists():
                targets = Metadata(Targets(version=1, expires=expiry_from(now, self.lifetimes[Targets.type])))
                self._sign_and_write(targets, root, "1.targets.json")
                snapshot = Metadata(
                    Snapshot(
                        version=1,
                        expires=expiry_from(now, self.lifetimes[Snapshot.type]),
                        meta={"targets.json": MetaFile(version=1)},
                    )
                )
                self._sign_and_write(snapshot, root, "1.snapshot.json")
                timestamp = Metadata(
                    Timestamp(
                        version=1,
                        expires=expiry_from(now, self.lifetimes[Timestamp.type]),
                        snapshot_meta=MetaFile(version=1),
                    )
                )
                self._sign_and_write(timestamp, root, TIMESTAMP_FILE)
                log.info("created TUF targets/snapshot/timestamp v1 in %s", self.metadata_dir)
