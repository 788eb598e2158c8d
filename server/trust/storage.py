"""The image repository on disk: its layout, its lock, reading metadata, storing target files.

Consistent snapshots under ``repo_dir``: ``metadata/N.<role>.json`` (``timestamp.json`` is the only
mutable file) and ``targets/<dir>/<sha256>.<name>``. Every file is written atomically; the current
state is always read through the chain timestamp -> snapshot -> targets. Mutations hold a thread
lock and an ``fcntl.flock`` on ``repo_dir/.lock``; readers take no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from tuf.api.metadata import Metadata, Root, Signed, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from device_client.protocol.fsutil import create_temp
from server.trust.keys import atomic_write

LOCK_FILE = ".lock"
TIMESTAMP_FILE = "timestamp.json"
#: targets metadata waiting for an offline signature (``fleet model sign``); not under metadata/
STAGED_TARGETS = "staged/targets.json"
_ROOT_FILE_RE = re.compile(r"([1-9][0-9]*)\.root\.json", re.ASCII)
#: one path segment of a target path: no empty, dot-only or hidden segments, no separators
#: (``fullmatch``, like every name check: ``match`` with ``$`` would let a final newline through)
_TARGET_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}", re.ASCII)
_HASH_ALGORITHM = "sha256"
_COPY_CHUNK = 1024 * 1024

_S = TypeVar("_S", Root, Timestamp, Snapshot, Targets)  # the roles Metadata[...] accepts


class RepositoryError(Exception):
    """Base of the image repository's errors."""


class InvalidTargetPath(RepositoryError, ValueError):
    """A target path that is not a safe, relative, ``/``-separated path."""


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


class RepositoryStore:
    """The files of a TUF repository under ``repo_dir`` and the lock that serialises writers."""

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = Path(repo_dir)
        self.metadata_dir = self.repo_dir / "metadata"
        self.targets_dir = self.repo_dir / "targets"
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        self._lock_fd: int | None = None
        self._serializer = JSONSerializer(compact=False)

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

    # -- reading metadata --------------------------------------------------------------------
    def _read(self, name: str, cls: type[_S]) -> Metadata[_S]:
        md: Metadata[_S] = Metadata.from_file(str(self.metadata_dir / name))
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
        return self._read(TIMESTAMP_FILE, Timestamp)

    def _snapshot(self, timestamp: Timestamp | None = None) -> Metadata[Snapshot]:
        timestamp = timestamp or self._timestamp().signed
        return self._read(f"{timestamp.snapshot_meta.version}.snapshot.json", Snapshot)

    def _targets(self, snapshot: Snapshot | None = None) -> Metadata[Targets]:
        snapshot = snapshot or self._snapshot().signed
        return self._read(f"{snapshot.meta['targets.json'].version}.targets.json", Targets)

    def _targets_version(self) -> int:
        """The current targets version (the one the current snapshot lists)."""
        return self._snapshot().signed.meta["targets.json"].version

    def _current_roles(self) -> dict[str, Signed]:
        """The current version of each top-level role, read through the chain."""
        timestamp = self._timestamp().signed
        snapshot = self._snapshot(timestamp).signed
        return {
            Root.type: self._root().signed,
            Targets.type: self._targets(snapshot).signed,
            Snapshot.type: snapshot,
            Timestamp.type: timestamp,
        }

    def trusted_root(self) -> dict[str, Any]:
        """The newest root metadata as a JSON object (what devices pin at enrollment)."""
        versions = self._root_versions()
        if not versions:
            raise RepositoryError("the repository is not initialised")
        return json.loads((self.metadata_dir / f"{versions[-1]}.root.json").read_bytes())

    def versions(self) -> dict[str, int]:
        """Current version of each top-level role."""
        return {role: signed.version for role, signed in self._current_roles().items()}

    def expires(self) -> dict[str, datetime]:
        """Current expiry of each top-level role."""
        return {role: signed.expires for role, signed in self._current_roles().items()}

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
        return self._stored(info)

    @property
    def staged_path(self) -> Path:
        """Where targets metadata waiting for an offline signature is kept (never served)."""
        return self.repo_dir / STAGED_TARGETS

    # -- writing metadata --------------------------------------------------------------------
    def _write(self, name: str, md: Metadata[Any]) -> None:
        atomic_write(self.metadata_dir / name, md.to_bytes(self._serializer))

    def _write_signed_root(self, md: Metadata[Root]) -> None:
        self._write(f"{md.signed.version}.root.json", md)
        self._write("root.json", md)

    # -- target files ------------------------------------------------------------------------
    def _stored(self, info: TargetFile) -> Path:
        """Where the target ``info`` is stored: its consistent-snapshot name under targets/."""
        return self.targets_dir / consistent_target_name(info.path, info.hashes[_HASH_ALGORITHM])

    def _describe_target(
        self, target_path: str, local_file: Path, custom: dict[str, Any]
    ) -> tuple[TargetFile, Path]:
        """The TargetFile of ``local_file`` as ``target_path`` (hashed, with ``custom``) and where it
        is stored (its consistent-snapshot name)."""
        check_target_path(target_path)
        with open(local_file, "rb") as fh:
            info = TargetFile.from_data(target_path, fh, [_HASH_ALGORITHM])
        info.unrecognized_fields["custom"] = dict(custom)
        return info, self._stored(info)

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

    def _delete_target_file(self, info: TargetFile) -> None:
        self._stored(info).unlink(missing_ok=True)
