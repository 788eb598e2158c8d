"""Crash-safe persistence of the daemon's state and its model slots.

``state.json`` carries a checksum and is replaced atomically, the previous good copy kept as
``state.json.prev``; each installed model version is extracted into a slot directory of its own.
Loading falls back to the previous copy, then to adopting the installed slots, so the known good
model is never lost. A full disk surfaces as :class:`DiskFull`. The layout on disk and the save
protocol: docs/architecture.md, "Device update".
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from .protocol import BundleError
from .protocol.bundle import MANIFEST_MEMBER, BundleManifest, extract_bundle
from .protocol.fsutil import fsync_dir
from .protocol.signing import canonical_json
from .state import DeviceState, Slot

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
PREV_FILE = "state.json.prev"
TMP_FILE = "state.json.tmp"
FORMAT = "fleet.device-state/1"
PARTIAL_SUFFIX = ".partial"
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class StoreError(Exception):
    """Persistence failed."""


class DiskFull(StoreError):
    """The data directory's file system is full; nothing was half-written."""

    def __init__(self, what: str, exc: OSError) -> None:
        super().__init__(f"disk full while {what}: {exc}")
        self.errno = exc.errno


class CorruptState(StoreError):
    """A state file failed its checksum or schema check."""


@contextlib.contextmanager
def _disk_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise DiskFull(what, exc) from exc
        raise


def encode_state(state: DeviceState) -> bytes:
    body = state.model_dump(mode="json")
    digest = hashlib.sha256(canonical_json(body)).hexdigest()
    return json.dumps({"format": FORMAT, "sha256": digest, "state": body}, indent=1).encode()


def decode_state(data: bytes) -> DeviceState:
    """Parse and verify a state file's bytes; every problem is :class:`CorruptState`."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptState(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("state"), dict):
        raise CorruptState("unknown state file format")
    if hashlib.sha256(canonical_json(doc["state"])).hexdigest() != doc.get("sha256"):
        raise CorruptState("checksum mismatch")
    try:
        return DeviceState.model_validate(doc["state"])
    except ValidationError as exc:
        raise CorruptState(f"invalid state: {str(exc).splitlines()[0]}") from None


@dataclass
class LoadResult:
    state: DeviceState
    source: Literal["primary", "previous", "fresh", "empty"]
    problems: list[str] = field(default_factory=list)


class StateStore:
    """The daemon's state file and model slots under one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.models_dir = self.data_dir / "models"
        self.staging_dir = self.data_dir / "staging"
        self.downloads_dir = self.data_dir / "downloads"
        for d in (self.data_dir, self.models_dir, self.staging_dir, self.downloads_dir):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def state_path(self) -> Path:
        return self.data_dir / STATE_FILE

    @property
    def prev_path(self) -> Path:
        return self.data_dir / PREV_FILE

    # ------------------------------------------------------------------ state file

    def _read(self, path: Path) -> DeviceState:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptState("missing") from None
        return decode_state(data)

    def load(self) -> LoadResult:
        """The newest intact state: ``state.json``, then ``state.json.prev``, else the installed slots."""
        problems: list[str] = []
        primary_exists = self.state_path.exists()
        try:
            return LoadResult(self._read(self.state_path), "primary")
        except CorruptState as exc:
            if primary_exists:
                problems.append(f"{STATE_FILE}: {exc}")
        prev_exists = self.prev_path.exists()
        try:
            state = self._read(self.prev_path)
            if primary_exists:
                log.warning("state.json is corrupt (%s); using state.json.prev", problems[-1])
            return LoadResult(state, "previous", problems)
        except CorruptState as exc:
            if prev_exists:
                problems.append(f"{PREV_FILE}: {exc}")
        if not primary_exists and not prev_exists:
            return LoadResult(DeviceState(), "empty")
        log.error("no intact state file (%s); adopting installed model slots", "; ".join(problems))
        return LoadResult(self.adopt_slots(DeviceState()), "fresh", problems)

    def save(self, state: DeviceState) -> None:
        """Durably replace the state file (temp + fsync + rotate + ``os.replace`` + dir fsync)."""
        data = encode_state(state)
        tmp = self.data_dir / TMP_FILE
        try:
            with _disk_errors("saving state"):
                # a new file: whatever was left or planted at the temp path (a symlink) is removed,
                # never followed
                tmp.unlink(missing_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    self._read(self.state_path)
                except CorruptState:
                    pass  # never rotate a bad or missing file over the good previous copy
                else:
                    os.replace(self.state_path, self.prev_path)
                os.replace(tmp, self.state_path)
                fsync_dir(self.data_dir)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ slots

    def slot_dir(self, slot: Slot) -> Path:
        return self.data_dir / slot.path

    def slot_relpath(self, model: str, version: str, variant: str) -> str:
        return f"models/{model}/{version}-{variant}"

    def install_bundle(
        self,
        bundle_tar: Path,
        *,
        max_member_bytes: int | None = None,
        max_total_bytes: int | None = None,
        replace: bool = False,
    ) -> Slot:
        """Extract a verified bundle into its slot directory (staging + rename) and return the slot.

        Re-installing a version whose slot already holds an identical ``bundle.json`` reuses it,
        unless ``replace`` (the slot is known damaged: its model files did not load), which
        extracts the bundle over it.
        """
        staging = self.staging_dir / uuid.uuid4().hex
        caps: dict[str, int] = {}
        if max_member_bytes is not None:
            caps["max_member_bytes"] = max_member_bytes
        if max_total_bytes is not None:
            caps["max_total_bytes"] = max_total_bytes
        try:
            with _disk_errors("extracting bundle"):
                try:
                    manifest = extract_bundle(bundle_tar, staging, **caps)
                except BundleError as exc:
                    cause = exc.__cause__
                    if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
                        raise DiskFull("extracting bundle", cause) from exc
                    raise
                for name in os.listdir(staging):
                    with open(staging / name, "rb") as fh:
                        os.fsync(fh.fileno())
                rel = self.slot_relpath(manifest.name, manifest.version, manifest.variant)
                target = self.data_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    if not replace and _same_manifest(target, staging):
                        shutil.rmtree(staging)
                        return _slot(manifest, rel)
                    old = self.staging_dir / f"old-{uuid.uuid4().hex}"
                    os.replace(target, old)
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(staging, target)
                fsync_dir(target.parent)
                return _slot(manifest, rel)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def scan_slots(self) -> list[Slot]:
        """Every complete slot directory (one with a readable bundle.json) under ``models/``."""
        slots: list[Slot] = []
        for model_dir in sorted(p for p in self.models_dir.iterdir() if p.is_dir()):
            for slot_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                try:
                    manifest = BundleManifest.model_validate_json((slot_dir / MANIFEST_MEMBER).read_bytes())
                except (OSError, ValidationError):
                    continue
                rel = slot_dir.relative_to(self.data_dir).as_posix()
                if rel == self.slot_relpath(manifest.name, manifest.version, manifest.variant):
                    slots.append(_slot(manifest, rel))
        return slots

    def adopt_slots(self, state: DeviceState) -> DeviceState:
        """Fill ``current``/``previous`` of models the state does not know from what is installed."""
        by_model: dict[str, list[Slot]] = {}
        for slot in self.scan_slots():
            by_model.setdefault(slot.model, []).append(slot)
        current = dict(state.current)
        previous = dict(state.previous)
        floor = dict(state.release_floor)
        for model, slots in by_model.items():
            if model in current:
                continue
            slots.sort(key=lambda s: (s.release, s.version), reverse=True)
            current[model] = slots[0]
            if len(slots) > 1:
                previous[model] = slots[1]
            floor[model] = max(floor.get(model, 0), slots[-1].release)
        return state.model_copy(update={"current": current, "previous": previous, "release_floor": floor})

    # ------------------------------------------------------------------ downloads and GC

    def download_paths(self, model: str, version: str, variant: str, sha256: str) -> tuple[Path, Path]:
        """(``.partial`` path, final path) of one bundle download."""
        stem = f"{model}-{version}-{variant}-{sha256[:16]}"
        return self.downloads_dir / f"{stem}.tar{PARTIAL_SUFFIX}", self.downloads_dir / f"{stem}.tar"

    def relpath(self, path: Path) -> str:
        return Path(path).absolute().relative_to(self.data_dir).as_posix()

    def gc(self, state: DeviceState) -> list[Path]:
        """Delete slots, staging leftovers and downloads that ``state`` does not reference."""
        removed: list[Path] = []
        keep = state.referenced_slot_paths()
        for model_dir in [p for p in self.models_dir.iterdir() if p.is_dir()]:
            for slot_dir in [p for p in model_dir.iterdir() if p.is_dir()]:
                if slot_dir.relative_to(self.data_dir).as_posix() not in keep:
                    shutil.rmtree(slot_dir, ignore_errors=True)
                    removed.append(slot_dir)
            with contextlib.suppress(OSError):
                model_dir.rmdir()  # only if empty
        for leftover in list(self.staging_dir.iterdir()):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
            removed.append(leftover)
        wanted: set[str] = set()
        if state.update is not None:
            wanted = {p for p in (state.update.partial_path, state.update.bundle_path) if p}
            partial = state.update.partial_path
            if partial and partial.endswith(PARTIAL_SUFFIX):
                # a kill between the rename of the finished download and the commit of the state
                # leaves the complete file next to a partial path that no longer exists
                wanted.add(partial[: -len(PARTIAL_SUFFIX)])
        for item in list(self.downloads_dir.iterdir()):
            if self.relpath(item) not in wanted:
                item.unlink(missing_ok=True)
                removed.append(item)
        return removed


def _slot(manifest: BundleManifest, rel: str) -> Slot:
    return Slot(
        model=manifest.name,
        version=manifest.version,
        release=manifest.release,
        variant=manifest.variant,
        path=rel,
    )


def _same_manifest(a: Path, b: Path) -> bool:
    try:
        return (a / MANIFEST_MEMBER).read_bytes() == (b / MANIFEST_MEMBER).read_bytes()
    except OSError:
        return False
