"""Key rotation and key custody: the logic behind ``fleet keys status|rotate|retire-director|export``.

A rotation writes the new private key as ``<destination>.new`` (0600), publishes under the
repository lock, then renames it into place; :func:`finish_pending` (run by every ``fleet keys``
command) completes or discards a rotation a crash interrupted. The keys, where they live and the
procedures: docs/keys.md.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import SSlibKey
from tuf.api.metadata import Root, Snapshot, Targets, Timestamp

from device_client.protocol.director_keys import (
    DIRECTOR_KEYS_CUSTOM,
    DIRECTOR_KEYS_TARGET,
    DirectorKeyList,
    parse_director_keys,
)
from device_client.protocol.signing import key_id
from server.trust.director import DIRECTOR_KEY_FILE, key_replaced
from server.trust.keys import load_private_key, write_private_key
from server.trust.repository import ImageRepository
from server.trust.signers import ROLE_KEY_FILES, SigningKeyUnavailable

log = logging.getLogger(__name__)

TUF_ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
DIRECTOR = "director"
ROLES = (*TUF_ROLES, DIRECTOR)
#: roles whose key may live offline; snapshot, timestamp and director sign while the server runs
OFFLINE_CAPABLE = (Root.type, Targets.type)
PENDING_SUFFIX = ".new"


class RotationError(Exception):
    """A rotation or export that cannot be done as asked (nothing was changed)."""


def key_file(key_dir: Path, role: str) -> Path:
    return Path(key_dir) / (DIRECTOR_KEY_FILE if role == DIRECTOR else ROLE_KEY_FILES[role])


def load_ed25519(path: Path) -> Ed25519PrivateKey:
    try:
        key = load_private_key(Path(path))
    except (OSError, ValueError, TypeError) as exc:
        raise RotationError(f"cannot read the private key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RotationError(f"{path} is not an Ed25519 private key")
    return key


def tuf_keyid(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The TUF keyid (python-tuf's, over the key's canonical JSON) of ``key``."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return SSlibKey.from_crypto(public).keyid


def _pending(path: Path) -> Path:
    return path.with_name(path.name + PENDING_SUFFIX)


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise RotationError(f"{path} already exists; refusing to overwrite a key file")


@contextmanager
def _pending_key(dest: Path) -> Iterator[Ed25519PrivateKey]:
    """A new key, written to ``<dest>.new`` (0600) and deleted again if the block fails; the
    caller renames it over ``dest`` once the repository names it."""
    pending = _pending(dest)
    _refuse_existing(pending)
    new = Ed25519PrivateKey.generate()
    write_private_key(pending, new)
    try:
        yield new
    except BaseException:
        pending.unlink(missing_ok=True)
        raise


def _offline_keys(
    *, root_key: Path | None = None, targets_key: Path | None = None
) -> dict[str, Ed25519PrivateKey]:
    """The offline root and targets keys passed by path, by role, to lend to the repository."""
    paths = {Root.type: root_key, Targets.type: targets_key}
    return {role: load_ed25519(path) for role, path in paths.items() if path is not None}


# -- status ---------------------------------------------------------------------------------------
@dataclass
class RoleStatus:
    role: str
    keyids: list[str]
    threshold: int | None
    version: int | None
    expires: datetime | None
    #: the private key is in key_dir and belongs to the role
    online: bool
    key_file: str
    problem: str = ""


@dataclass
class KeyStatus:
    roles: list[RoleStatus]
    #: the director key list published in the repository (None: never published)
    director_list_version: int | None
    director_list: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "roles": [
                {**r.__dict__, "expires": r.expires.isoformat() if r.expires else None} for r in self.roles
            ],
            "director_list_version": self.director_list_version,
            "director_list": self.director_list,
            "pending": self.pending,
        }


def status(repo: ImageRepository) -> KeyStatus:
    """Every role's key ids, version and expiry, and whether its private key is in ``key_dir``."""
    root = repo._root().signed
    versions, expires = repo.versions(), repo.expires()
    roles: list[RoleStatus] = []
    for role in TUF_ROLES:
        path = key_file(repo.key_dir, role)
        online, problem = False, ""
        if path.exists():
            try:
                repo._signer(role, root)
                online = True
            except SigningKeyUnavailable as exc:
                problem = str(exc)
        roles.append(
            RoleStatus(
                role=role,
                keyids=list(root.roles[role].keyids),
                threshold=root.roles[role].threshold,
                version=versions[role],
                expires=expires[role],
                online=online,
                key_file=str(path),
                problem=problem,
            )
        )
    path = key_file(repo.key_dir, DIRECTOR)
    published = published_director_keys(repo)
    director_ids = [key_id(load_ed25519(path).public_key())] if path.exists() else []
    roles.append(
        RoleStatus(
            role=DIRECTOR,
            keyids=director_ids,
            threshold=None,
            version=published.version if published else None,
            expires=None,
            online=path.exists(),
            key_file=str(path),
            problem=(
                "the director key is not the first of the published director key list"
                if published and director_ids and published.primary != director_ids[0]
                else ""
            ),
        )
    )
    pending = sorted(str(p) for p in Path(repo.key_dir).glob(f"*{PENDING_SUFFIX}"))
    return KeyStatus(
        roles=roles,
        director_list_version=published.version if published else None,
        director_list=published.keyids if published else [],
        pending=pending,
    )


# -- crash recovery -------------------------------------------------------------------------------
def finish_pending(repo: ImageRepository) -> list[str]:
    """Complete or discard a rotation interrupted between writing ``<key>.new`` and the rename."""
    messages: list[str] = []
    root = repo._root().signed
    published = published_director_keys(repo)
    for role in ROLES:
        dest = key_file(repo.key_dir, role)
        pending = _pending(dest)
        if not pending.exists():
            continue
        key = load_ed25519(pending)
        if role == DIRECTOR:
            adopted = published is not None and key_id(key.public_key()) in published.keyids
        else:
            adopted = tuf_keyid(key) in root.roles[role].keyids
        if adopted:
            os.replace(pending, dest)
            if role == DIRECTOR:
                key_replaced()
            messages.append(f"completed the interrupted {role} rotation: {pending.name} -> {dest.name}")
        else:
            pending.unlink()
            messages.append(f"discarded {pending.name}: the interrupted {role} rotation never took effect")
    for message in messages:
        log.warning("%s", message)
    return messages


# -- TUF roles ------------------------------------------------------------------------------------
@dataclass
class Rotated:
    role: str
    old_keyids: list[str]
    new_keyid: str
    new_key_file: Path
    root_version: int | None = None
    director_list_version: int | None = None
    removed: list[Path] = field(default_factory=list)


def rotate_tuf_role(
    repo: ImageRepository,
    role: str,
    *,
    root_key: Path | None = None,
    targets_key: Path | None = None,
    out: Path | None = None,
) -> Rotated:
    """Rotate the key of a TUF role; the new private key goes to ``out`` or to ``key_dir``.

    ``root_key``/``targets_key``: where the current root/targets key is when it is not in
    ``key_dir`` (offline). When the current key of ``role`` is offline, ``out`` is required (the
    new key is written there and never touches ``key_dir``). An old key in ``key_dir`` is deleted.
    """
    if role not in TUF_ROLES:
        raise RotationError(f"unknown TUF role {role!r}")
    lent = _offline_keys(root_key=root_key, targets_key=targets_key)
    if role in (Snapshot.type, Timestamp.type) and out is not None:
        raise RotationError(f"the {role} key must stay online: --out is only for root and targets")
    in_dir = key_file(repo.key_dir, role)
    root = repo._root().signed
    old_keyids = list(root.roles[role].keyids)
    if role == Root.type and Root.type not in lent and not in_dir.exists():
        raise RotationError(f"the root key is not in {repo.key_dir}: pass --root-key PATH")
    if role != Root.type and Root.type not in lent and not key_file(repo.key_dir, Root.type).exists():
        raise RotationError("a new root must be signed: pass --root-key PATH (the root key is offline)")
    old_here = in_dir.exists()
    if not old_here and out is None:
        raise RotationError(f"the current {role} key is offline: pass --out PATH for the new key")
    dest = Path(out) if out is not None else in_dir
    if dest != in_dir:
        _refuse_existing(dest)
    removed: list[Path] = []

    def commit() -> None:
        os.replace(_pending(dest), dest)
        if dest != in_dir and in_dir.exists():
            in_dir.unlink()
            removed.append(in_dir)
        elif dest == in_dir and old_here:
            removed.append(in_dir)  # overwritten by the new key

    with _pending_key(dest) as new, repo.using_keys(lent):
        if role == Root.type:
            version = repo.rotate_root(new, on_committed=commit)
        else:
            version = repo.rotate_role(role, new, on_committed=commit)
    return Rotated(
        role=role,
        old_keyids=old_keyids,
        new_keyid=tuf_keyid(new),
        new_key_file=dest,
        root_version=version,
        removed=removed,
    )


# -- director -------------------------------------------------------------------------------------
def published_director_keys(repo: ImageRepository) -> DirectorKeyList | None:
    """The director key list the repository publishes now, or None."""
    if repo.get_target(DIRECTOR_KEYS_TARGET) is None:
        return None
    return parse_director_keys(repo.target_file(DIRECTOR_KEYS_TARGET).read_bytes())


def publish_director_keys(
    repo: ImageRepository, keys: list[Ed25519PublicKey], *, targets_key: Path | None = None
) -> DirectorKeyList:
    """Publish ``keys`` (the signing key first) as the next version of the director key list."""
    current = published_director_keys(repo)
    doc = DirectorKeyList(version=(current.version + 1) if current else 1, keys=tuple(keys))
    lent = _offline_keys(targets_key=targets_key)
    with tempfile.TemporaryDirectory(prefix="director-keys-") as tmp:
        path = Path(tmp) / "director-keys.json"
        path.write_bytes(doc.to_bytes())
        with repo.using_keys(lent):
            repo.add_target(DIRECTOR_KEYS_TARGET, path, dict(DIRECTOR_KEYS_CUSTOM), replace=True)
    return doc


def rotate_director(repo: ImageRepository, *, targets_key: Path | None = None) -> Rotated:
    """Make a new director key, publish [new, old, ...] (overlap), then switch signing to it.

    A server in this process picks the new ``director.key`` up on its next signature, one in
    another process within a second (:class:`server.trust.director.Director` reloads a replaced
    key file, checking it at most every ``CHECK_INTERVAL_S``). Devices that see a
    DesiredState signed by the new key refresh the list through TUF and trust it from then on.
    """
    dest = key_file(repo.key_dir, DIRECTOR)
    if not dest.exists():
        raise RotationError(f"no director key at {dest}")
    old = load_ed25519(dest).public_key()
    published = published_director_keys(repo)
    keys = [old] + [k for k in (published.keys if published else ()) if key_id(k) != key_id(old)]
    with _pending_key(dest) as new:
        listed = publish_director_keys(repo, [new.public_key(), *keys], targets_key=targets_key)
    os.replace(_pending(dest), dest)  # outside: once the list is out, finish_pending() completes it
    key_replaced()  # this process's directors switch at once; others within their check interval
    return Rotated(
        role=DIRECTOR,
        old_keyids=[key_id(k) for k in keys],
        new_keyid=key_id(new.public_key()),
        new_key_file=dest,
        director_list_version=listed.version,
        removed=[dest],
    )


def retire_director_key(
    repo: ImageRepository, keyid: str, *, targets_key: Path | None = None
) -> DirectorKeyList:
    """Publish the director key list without ``keyid`` (a key prefix of 8+ hex digits will do)."""
    published = published_director_keys(repo)
    if published is None:
        raise RotationError("no director key list is published: rotate the director key first")
    matches = [k for k in published.keys if len(keyid) >= 8 and key_id(k).startswith(keyid.lower())]
    if len(matches) != 1:
        raise RotationError(f"{keyid!r} matches {len(matches)} of the listed keys {published.keyids}")
    retired = key_id(matches[0])
    if retired == published.primary:
        raise RotationError(f"{retired} is the key the director signs with now; rotate it first")
    current = load_ed25519(key_file(repo.key_dir, DIRECTOR)).public_key()
    if key_id(current) == retired:
        raise RotationError(f"{retired} is still the key in {DIRECTOR_KEY_FILE}")
    return publish_director_keys(
        repo, [k for k in published.keys if key_id(k) != retired], targets_key=targets_key
    )


# -- export ---------------------------------------------------------------------------------------
def export_key(repo: ImageRepository, role: str, out: Path) -> Path:
    """Move the private key of ``role`` (root or targets) out of ``key_dir`` to ``out`` (0600)."""
    if role not in OFFLINE_CAPABLE:
        raise RotationError(f"the {role} key must stay online; only root and targets can be exported")
    src = key_file(repo.key_dir, role)
    if not src.exists():
        raise RotationError(f"the {role} key is not in {repo.key_dir}")
    out = Path(out)
    _refuse_existing(out)
    key = load_ed25519(src)
    write_private_key(out, key)
    if load_ed25519(out).private_bytes_raw() != key.private_bytes_raw():
        out.unlink()
        raise RotationError(f"{out} does not read back as the same key; nothing was removed")
    src.unlink()
    return out
