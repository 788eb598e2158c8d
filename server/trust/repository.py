"""The TUF image repository (python-tuf ``tuf.api.metadata``): root, targets, snapshot, timestamp.

Consistent snapshots under ``repo_dir`` (any static server or CDN can serve them), one Ed25519 key
per role in ``key_dir``; root and targets keys may live offline. Publishing writes the target,
then targets, snapshot and timestamp, each atomically, so a reader never sees a half-published
state; revocation unlists a target and deletes its file. Mutations hold a thread lock and an
``fcntl.flock``. Layout, rotation and crash safety: docs/architecture.md, "Image repository (TUF)".
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    TOP_LEVEL_ROLE_NAMES,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from device_client.protocol.fsutil import create_temp
from server.trust.keys import atomic_write, load_or_create_ed25519, load_private_key

log = logging.getLogger(__name__)

ROLE_KEY_FILES: dict[str, str] = {
    Root.type: "tuf-root.key",
    Targets.type: "tuf-targets.key",
    Snapshot.type: "tuf-snapshot.key",
    Timestamp.type: "tuf-timestamp.key",
}
LOCK_FILE = ".lock"
#: targets metadata waiting for an offline signature (``fleet model sign``); not under metadata/
STAGED_TARGETS = "staged/targets.json"
#: how far beyond the targets lifetime an offline signer may date ``expires`` (clock skew)
_EXPIRY_SLACK = timedelta(hours=1)
_ROOT_FILE_RE = re.compile(r"([1-9][0-9]*)\.root\.json", re.ASCII)
#: one path segment of a target path: no empty, dot-only or hidden segments, no separators
#: (``fullmatch``, like every name check: ``match`` with ``$`` would let a final newline through)
_TARGET_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}", re.ASCII)
_HASH_ALGORITHM = "sha256"
_COPY_CHUNK = 1024 * 1024

_S = TypeVar("_S", bound=Signed)


class RepositoryError(Exception):
    """Base of the image repository's errors."""


class SigningKeyUnavailable(RepositoryError):
    """The key of a role is not on this host (kept offline) or does not match root."""


class InvalidTargetPath(RepositoryError, ValueError):
    """A target path that is not a safe, relative, ``/``-separated path."""


class StagingError(RepositoryError):
    """Nothing is staged for an offline signature, or what came back is not what is staged."""


class SignatureRejected(RepositoryError, ValueError):
    """Offline-signed metadata that does not verify (or is malformed or wrongly dated)."""


class TargetExists(RepositoryError):
    """The target path is already listed with different content."""


def check_target_path(path: str) -> str:
    """``path`` if it is a safe target path (``a/b/c.tar``), else :class:`InvalidTargetPath`."""
    if not path or len(path) > 512:
        raise InvalidTargetPath(f"target path must be 1..512 characters: {path!r}")
    for segment in path.split("/"):
        if not _TARGET_SEGMENT_RE.fullmatch(segment) or segment in (".", ".."):
            raise InvalidTargetPath(f"unsafe target path {path!r}")
    return path


def consistent_target_name(path: str, sha256: str) -> str:
    """The file name of a target under consistent snapshots: ``<dir>/<sha256>.<basename>``."""
    parent, sep, name = path.rpartition("/")
    return f"{parent}{sep}{sha256}.{name}"


def as_signer(key: Signer | Ed25519PrivateKey) -> Signer:
    """A securesystemslib signer for ``key`` (an Ed25519 private key or already a signer)."""
    if isinstance(key, Signer):
        return key
    return CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _expiry(now: datetime, lifetime: timedelta) -> datetime:
    # TUF metadata carries whole seconds
    return (now + lifetime).replace(microsecond=0)


def _needs_refresh(signed: Signed, lifetime: timedelta, now: datetime) -> bool:
    """True when less than half of the role's lifetime is left before it expires."""
    return signed.expires - now < lifetime / 2


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


class ImageRepository:
    """A TUF repository on the local file system; layout: docs/architecture.md.

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
        self.repo_dir = Path(repo_dir)
        self.key_dir = Path(key_dir)
        self.metadata_dir = self.repo_dir / "metadata"
        self.targets_dir = self.repo_dir / "targets"
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
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        self._lock_fd: int | None = None
        self._serializer = JSONSerializer(compact=False)
        #: keys lent for one operation (:meth:`using_keys`): offline keys, by role
        self._lent: dict[str, Signer] = {}
        #: per-role signer lists that override the single key while a rotation re-signs a role
        self._transition: dict[str, list[Signer]] = {}

    # -- locking -----------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the repository lock: a re-entrant thread lock plus ``flock`` across processes."""
        with self._thread_lock:
            if self._lock_depth == 0:
                self.repo_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.repo_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                    os.close(self._lock_fd)
                    self._lock_fd = None

    # -- keys and signing --------------------------------------------------------------------
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

    # -- reading -----------------------------------------------------------------------------
    def _read(self, name: str, cls: type[_S]) -> Metadata[_S]:
        md = Metadata.from_file(str(self.metadata_dir / name))
        if not isinstance(md.signed, cls):
            raise RepositoryError(f"{name} holds {md.signed.type}, expected {cls.type}")
        return md

    def _root_versions(self) -> list[int]:
        if not self.metadata_dir.is_dir():
            return []
        found = (_ROOT_FILE_RE.fullmatch(p.name) for p in self.metadata_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _root(self) -> Metadata[Root]:
        versions = self._root_versions()
        if not versions:
            raise RepositoryError(f"no root metadata in {self.metadata_dir}; call initialize() first")
        return self._read(f"{versions[-1]}.root.json", Root)

    def _timestamp(self) -> Metadata[Timestamp]:
        return self._read("timestamp.json", Timestamp)

    def _snapshot(self, timestamp: Timestamp | None = None) -> Metadata[Snapshot]:
        timestamp = timestamp or self._timestamp().signed
        return self._read(f"{timestamp.snapshot_meta.version}.snapshot.json", Snapshot)

    def _targets(self, snapshot: Snapshot | None = None) -> Metadata[Targets]:
        snapshot = snapshot or self._snapshot().signed
        return self._read(f"{snapshot.meta['targets.json'].version}.targets.json", Targets)

    def trusted_root(self) -> dict[str, Any]:
        """The newest root metadata as a JSON object (what devices pin at enrollment)."""
        versions = self._root_versions()
        if not versions:
            raise RepositoryError("the repository is not initialised")
        return json.loads((self.metadata_dir / f"{versions[-1]}.root.json").read_bytes())

    def versions(self) -> dict[str, int]:
        """Current version of each top-level role."""
        timestamp = self._timestamp().signed
        snapshot = self._snapshot(timestamp).signed
        return {
            Root.type: self._root().signed.version,
            Targets.type: snapshot.meta["targets.json"].version,
            Snapshot.type: snapshot.version,
            Timestamp.type: timestamp.version,
        }

    def expires(self) -> dict[str, datetime]:
        """Current expiry of each top-level role."""
        timestamp = self._timestamp().signed
        snapshot = self._snapshot(timestamp).signed
        return {
            Root.type: self._root().signed.expires,
            Targets.type: self._targets(snapshot).signed.expires,
            Snapshot.type: snapshot.expires,
            Timestamp.type: timestamp.expires,
        }

    def list_targets(self) -> dict[str, TargetFile]:
        """Every target listed in the current targets metadata, by path."""
        return dict(self._targets().signed.targets)

    def get_target(self, path: str) -> TargetFile | None:
        """The listed target at ``path`` (length, hashes, custom), or None."""
        return self._targets().signed.targets.get(path)

    def target_file(self, path: str) -> Path:
        """Where the listed target ``path`` is stored on disk (its consistent-snapshot name)."""
        info = self.get_target(path)
        if info is None:
            raise KeyError(path)
        return self.targets_dir / consistent_target_name(path, info.hashes[_HASH_ALGORITHM])

    # -- writing -----------------------------------------------------------------------------
    def _write(self, name: str, md: Metadata[Any]) -> None:
        atomic_write(self.metadata_dir / name, md.to_bytes(self._serializer))

    def _sign_and_write(self, md: Metadata[Any], root: Root, name: str) -> None:
        signers = self._transition.get(md.signed.type) or [self._signer(md.signed.type, root)]
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        self._write(name, md)

    def _write_root(self, md: Metadata[Root]) -> None:
        md.sign(self._signer(Root.type, md.signed))
        self._write_signed_root(md)

    def _write_signed_root(self, md: Metadata[Root]) -> None:
        self._write(f"{md.signed.version}.root.json", md)
        self._write("root.json", md)

    # -- key rotation ------------------------------------------------------------------------
    def _next_root(self, current: Metadata[Root], now: datetime) -> Metadata[Root]:
        nxt = Metadata[Root].from_bytes(current.to_bytes())
        nxt.signatures.clear()
        nxt.signed.version += 1
        nxt.signed.expires = _expiry(now, self.lifetimes[Root.type])
        return nxt

    @staticmethod
    def _replace_role_key(root: Root, role: str, key: SSlibKey) -> None:
        if key.keyid in root.roles[role].keyids:
            raise ValueError(f"the new {role} key is already a {role} key of the current root")
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(key, role)

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
            nxt = self._next_root(current, now)
            self._replace_role_key(nxt.signed, Root.type, new_signer.public_key)
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
            nxt = self._next_root(current, now)
            self._replace_role_key(nxt.signed, role, new_signer.public_key)
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
        offline signature: :meth:`publish_signed_targets`). Callers publish the staged targets
        when there are any (:meth:`_working_targets`), so the stage is dropped once targets are out,
        unless ``keep_stage`` (a key rotation re-publishes the current targets only).
        """
        written = []
        timestamp = self._timestamp()
        snapshot = self._snapshot(timestamp.signed)
        if targets is not None:
            if presigned:  # signed elsewhere (an offline targets key): written as it came
                self._write(f"{targets.signed.version}.targets.json", targets)
            else:
                targets.signed.version = snapshot.signed.meta["targets.json"].version + 1
                targets.signed.expires = _expiry(now, self.lifetimes[Targets.type])
                self._sign_and_write(targets, root, f"{targets.signed.version}.targets.json")
            snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
            written.append(Targets.type)
        if targets is not None or force_snapshot:
            snapshot.signed.version += 1
            snapshot.signed.expires = _expiry(now, self.lifetimes[Snapshot.type])
            self._sign_and_write(snapshot, root, f"{snapshot.signed.version}.snapshot.json")
            written.append(Snapshot.type)
        timestamp.signed.version += 1
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        timestamp.signed.expires = _expiry(now, self.lifetimes[Timestamp.type])
        self._sign_and_write(timestamp, root, "timestamp.json")
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
                root = Root(expires=_expiry(now, self.lifetimes[Root.type]), consistent_snapshot=True)
                for role in sorted(TOP_LEVEL_ROLE_NAMES):
                    key = load_or_create_ed25519(self._key_path(role))
                    root.add_key(SSlibKey.from_crypto(key.public_key()), role)
                self._write_root(Metadata(root))
                log.info("created TUF root v1 in %s", self.metadata_dir)
            root = self._root().signed
            if not root.consistent_snapshot:
                raise RepositoryError("the repository's root does not use consistent snapshots")
            for role in TOP_LEVEL_ROLE_NAMES:
                if self.has_key(role):
                    self._signer(role, root)  # raises if the key does not belong to the root
            if not (self.metadata_dir / "timestamp.json").exists():
                targets = Metadata(Targets(version=1, expires=_expiry(now, self.lifetimes[Targets.type])))
                self._sign_and_write(targets, root, "1.targets.json")
                snapshot = Metadata(
                    Snapshot(
                        version=1,
                        expires=_expiry(now, self.lifetimes[Snapshot.type]),
                        meta={"targets.json": MetaFile(version=1)},
                    )
                )
                self._sign_and_write(snapshot, root, "1.snapshot.json")
                timestamp = Metadata(
                    Timestamp(
                        version=1,
                        expires=_expiry(now, self.lifetimes[Timestamp.type]),
                        snapshot_meta=MetaFile(version=1),
                    )
                )
                self._sign_and_write(timestamp, root, "timestamp.json")
                log.info("created TUF targets/snapshot/timestamp v1 in %s", self.metadata_dir)

    def _copy_target(self, local_file: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temp(dest, 0o644)  # a random new file: nothing planted there is followed
        try:
            with os.fdopen(fd, "wb") as out, open(local_file, "rb") as src:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _describe_target(
        self, target_path: str, local_file: Path, custom: dict[str, Any]
    ) -> tuple[TargetFile, Path]:
        """The TargetFile of ``local_file`` as ``target_path`` (hashed, with ``custom``) and where it
        is stored (its consistent-snapshot name)."""
        check_target_path(target_path)
        with open(local_file, "rb") as fh:
            info = TargetFile.from_data(target_path, fh, [_HASH_ALGORITHM])
        info.unrecognized_fields["custom"] = dict(custom)
        return info, self.targets_dir / consistent_target_name(target_path, info.hashes[_HASH_ALGORITHM])

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
                self._delete_target_file(target_path, old)
            log.info("published target %s (%d bytes)", target_path, info.length)
            return info

    def _delete_target_file(self, path: str, info: TargetFile) -> None:
        name = consistent_target_name(path, info.hashes[_HASH_ALGORITHM])
        (self.targets_dir / name).unlink(missing_ok=True)

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
                self._delete_target_file(target_path, info)
            log.info("removed target %s", target_path)
            return info

    def restore_target(self, info: TargetFile) -> None:
        """Re-list a target removed with ``delete_file=False`` whose file is still stored."""
        check_target_path(info.path)
        stored = self.targets_dir / consistent_target_name(info.path, info.hashes[_HASH_ALGORITHM])
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
            for listed in (self.get_target(info.path), staged and staged.signed.targets.get(info.path)):
                if listed is not None and listed.hashes == info.hashes:
                    return False
            stored = self.targets_dir / consistent_target_name(info.path, info.hashes[_HASH_ALGORITHM])
            if not stored.exists():
                return False
            stored.unlink()
            return True

    # -- offline targets signing: staged targets metadata ------------------------------------
    @property
    def staged_path(self) -> Path:
        """Where targets metadata waiting for an offline signature is kept (never served)."""
        return self.repo_dir / STAGED_TARGETS

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
            if md.signed.version != self._snapshot().signed.meta["targets.json"].version + 1:
                self._stage(md)
            return md

    def _working_targets(self) -> Metadata[Targets]:
        """What the next targets version starts from: the staged one if any, else the current."""
        return self.staged_targets() or self._targets()

    def _stage(self, md: Metadata[Targets]) -> None:
        """Write ``md`` as the staged targets: the next version, a fresh expiry, no signatures."""
        md.signed.version = self._snapshot().signed.meta["targets.json"].version + 1
        md.signed.expires = _expiry(self._clock(), self.lifetimes[Targets.type])
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
        renewal_due = _needs_refresh(current, self.lifetimes[Targets.type], self._clock())
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

    def refresh_expiring(self, now: datetime | None = None) -> list[str]:
        """Re-sign every role with less than half its lifetime left (and the roles above it).

        Root and targets are only re-signed when their key is on this host. Returns the names of
        the roles written, e.g. ``["timestamp"]``; empty when nothing was due.
        """
        with self._locked():
            now = now or self._clock()
            written: list[str] = []
            root_md = self._root()
            if _needs_refresh(root_md.signed, self.lifetimes[Root.type], now):
                if self.has_key(Root.type):
                    root_md.signed.version += 1
                    root_md.signed.expires = _expiry(now, self.lifetimes[Root.type])
                    self._write_root(root_md)
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
            if staged or _needs_refresh(targets.signed, self.lifetimes[Targets.type], now):
                if self.has_key(Targets.type):
                    targets_md = self._working_targets()  # staged changes go out with it
                elif not staged:
                    self.stage_renewal()
                    log.warning(
                        "targets metadata expires at %s; a renewal is staged: sign it with "
                        "`fleet model sign` on the targets key's workstation",
                        targets.signed.expires,
                    )
            snapshot_due = _needs_refresh(snapshot, self.lifetimes[Snapshot.type], now)
            timestamp_due = _needs_refresh(timestamp, self.lifetimes[Timestamp.type], now)
            if targets_md is not None or snapshot_due or timestamp_due:
                written += self._publish(root, now, targets_md, force_snapshot=snapshot_due)
            return written
