"""Trust decisions of the device: is a DesiredState genuine, current, and backed by the image repo?

Two independent keys must agree before anything is installed: :func:`verify_desired` checks the
director's envelope (signature, device id, seq, expiry), :class:`TufVerifier` checks that a fresh
``tuf.ngclient`` refresh lists the same target, and :func:`check_release_floor` refuses downgrades.
Rejections carry a short stable ``Rejected.code``; :class:`DirectorKeyring` follows the director
key list published through TUF (docs/architecture.md, "What the device checks").
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig

from .fetcher import HttpSettings, HttpxFetcher
from .protocol import DesiredState, InvalidPayload, SignatureError, validate_payload
from .protocol.director_keys import (
    DIRECTOR_KEYS_TARGET,
    MAX_DIRECTOR_KEYS_BYTES,
    DirectorKeyList,
    parse_director_keys,
)
from .protocol.fsutil import atomic_write
from .protocol.messages import MAX_PAYLOAD_BYTES
from .protocol.signing import public_key_from_pem, verify_envelope
from .state import Slot

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A desired state the device refuses; ``code`` is a stable machine-readable reason."""

    code = "rejected"

    def __init__(self, message: str, *, seq: int | None = None, authentic: bool = False) -> None:
        super().__init__(message)
        self.message = message
        #: the seq the message claims (None when it could not be read)
        self.seq = seq
        #: whether the director's signature checked out (then the rejection concerns that seq)
        self.authentic = authentic

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.message}"


class Malformed(Rejected):
    code = "malformed"


class Unsigned(Rejected):
    code = "unsigned"


class BadSignature(Rejected):
    code = "bad_signature"


class WrongDevice(Rejected):
    code = "wrong_device"


class Duplicate(Rejected):
    code = "duplicate"


class Replayed(Rejected):
    code = "replayed"


class Expired(Rejected):
    code = "expired"


class TargetNotListed(Rejected):
    code = "target_not_listed"


class TargetMismatch(Rejected):
    code = "target_mismatch"


class RepositoryError(Rejected):
    code = "repository_error"


class RepositoryUnavailable(RepositoryError):
    """The repository could not be reached (network, timeout, HTTP 5xx): retry later."""

    code = "repository_unavailable"


class ReleaseFloor(Rejected):
    code = "release_floor"


def _claimed_seq(signed: Any) -> int | None:
    if isinstance(signed, dict) and isinstance(signed.get("seq"), int):
        return signed["seq"]
    return None


def verify_desired(
    envelope_bytes: bytes,
    director_keys: list[Ed25519PublicKey],
    device_id: str,
    last_seq: int,
    now: datetime,
) -> DesiredState:
    """The DesiredState inside ``envelope_bytes`` if it is acceptable; else raise :class:`Rejected`."""
    if len(envelope_bytes) > MAX_PAYLOAD_BYTES:
        raise Malformed(f"message of {len(envelope_bytes)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        envelope = json.loads(envelope_bytes)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: deep nesting
        raise Malformed(f"not JSON: {exc}") from None
    signed = envelope.get("signed") if isinstance(envelope, dict) else None
    seq = _claimed_seq(signed)
    if isinstance(envelope, dict) and envelope.get("signatures") == []:
        raise Unsigned("the envelope carries no signature", seq=seq)
    try:
        body = verify_envelope(envelope, director_keys)
    except InvalidPayload as exc:
        raise Malformed(str(exc), seq=seq) from None
    except SignatureError as exc:
        raise BadSignature(str(exc), seq=seq) from None
    try:
        desired = validate_payload(body, DesiredState)
    except InvalidPayload as exc:
        raise Malformed(str(exc), seq=seq) from None
    if desired.device_id != device_id:
        raise WrongDevice(f"addressed to {desired.device_id!r}, this is {device_id!r}", seq=desired.seq)
    if desired.seq == last_seq:
        raise Duplicate(f"seq {desired.seq} was already accepted", seq=desired.seq)
    if desired.seq < last_seq:
        raise Replayed(f"seq {desired.seq} is older than the accepted {last_seq}", seq=desired.seq)
    if desired.expires_at <= now:
        raise Expired(f"expired at {desired.expires_at.isoformat()}", seq=desired.seq)
    if desired.expires_at <= desired.issued_at:
        raise Malformed("expires_at is not after issued_at", seq=desired.seq)
    sha = desired.hashes.get("sha256", "")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise Malformed("hashes must include a lowercase hex sha256", seq=desired.seq)
    return desired


def envelope_keyids(envelope_bytes: bytes) -> list[str]:
    """The keyids an envelope claims to be signed by (empty when unreadable)."""
    try:
        envelope = json.loads(envelope_bytes)
    except (ValueError, UnicodeDecodeError):
        return []
    sigs = envelope.get("signatures") if isinstance(envelope, dict) else None
    if not isinstance(sigs, list):
        return []
    return [str(s.get("keyid")) for s in sigs if isinstance(s, dict) and s.get("keyid")]


def check_signer(envelope_bytes: bytes, director_keys: list[Ed25519PublicKey], seq: int | None) -> None:
    """:class:`BadSignature` unless one of ``director_keys`` signed the envelope (a re-check)."""
    try:
        verify_envelope(json.loads(envelope_bytes), director_keys)
    except (ValueError, InvalidPayload, SignatureError) as exc:
        raise BadSignature(f"{exc} (after refreshing the director keys)", seq=seq) from None


class DirectorKeyring:
    """The director keys this device trusts (docs/architecture.md, trust model); thread-safe."""

    def __init__(self, enrolled_pem: Path, store: Path) -> None:
        self.enrolled_pem = Path(enrolled_pem)
        self.store = Path(store)
        self._lock = threading.Lock()
        self._list = self._load()

    def _load(self) -> DirectorKeyList:
        if self.store.exists():
            try:
                return parse_director_keys(self.store.read_bytes())
            except InvalidPayload as exc:  # a damaged file: fall back to the pin, sync again later
                log.error("ignoring %s: %s", self.store, exc)
        return DirectorKeyList(version=0, keys=(public_key_from_pem(self.enrolled_pem.read_bytes()),))

    @property
    def keys(self) -> list[Ed25519PublicKey]:
        return list(self._list.keys)

    @property
    def keyids(self) -> list[str]:
        return self._list.keyids

    @property
    def primary(self) -> str:
        return self._list.primary

    @property
    def version(self) -> int:
        return self._list.version

    def stored_sha256(self) -> str | None:
        try:
            return hashlib.sha256(self.store.read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    def apply(self, data: bytes) -> bool:
        """Adopt the (TUF-verified) list ``data``; True if the trusted keys changed."""
        new = parse_director_keys(data)
        with self._lock:
            if new.version < self._list.version:
                raise InvalidPayload(
                    f"director key list version {new.version} is older than the trusted {self._list.version}"
                )
            changed = new.keyids != self._list.keyids
            atomic_write(self.store, data, 0o644)
            self._list = new
        if changed:
            log.warning("director keys now %s (list version %d)", [k[:16] for k in new.keyids], new.version)
        return changed


def check_release_floor(desired: DesiredState, floor: int, previous: Slot | None) -> None:
    """Refuse a release below ``floor`` unless it is the device's own previous version."""
    if desired.release >= floor:
        return
    if (
        previous is not None
        and previous.model == desired.model
        and previous.version == desired.version
        and previous.release == desired.release
        and previous.variant == desired.variant
    ):
        return
    raise ReleaseFloor(
        f"release {desired.release} of {desired.model} is below the floor {floor}"
        " and is not the version this device ran before",
        seq=desired.seq,
        authentic=True,
    )


def target_url(targets_url: str, target: str, sha256: str) -> str:
    """The consistent-snapshot URL of ``target`` (``<dir>/<sha256>.<basename>``)."""
    directory, base = posixpath.split(target)
    name = f"{sha256}.{base}"
    return targets_url.rstrip("/") + "/" + (f"{directory}/{name}" if directory else name)


class TufVerifier:
    """Checks a DesiredState against the TUF image repository (docs/architecture.md, trust model)."""

    def __init__(
        self,
        metadata_dir: Path,
        metadata_url: str,
        targets_url: str,
        http: HttpSettings,
        *,
        max_metadata_bytes: int = 16 * 1024 * 1024,
        deadline_s: float = 60.0,
        keyring: DirectorKeyring | None = None,
    ) -> None:
        self.keyring = keyring
        self.metadata_dir = Path(metadata_dir)
        self.metadata_url = metadata_url
        self.targets_url = targets_url
        self.http = http
        self.max_metadata_bytes = max_metadata_bytes
        self.deadline_s = deadline_s

    def sync_director_keys(self) -> bool:
        """Refresh the metadata and adopt the published director key list; True if keys changed."""
        changed = False

        def sync(updater: Updater) -> None:
            nonlocal changed
            changed = self._sync_keys(updater)

        self._refreshed(sync)
        return changed

    def _sync_keys(self, updater: Updater) -> bool:
        """Download the director key list if it changed (ngclient checks its length and hashes)."""
        if self.keyring is None:
            return False
        info = updater.get_targetinfo(DIRECTOR_KEYS_TARGET)
        if info is None:
            return False  # never published: the enrollment pin stays
        if info.length > MAX_DIRECTOR_KEYS_BYTES:
            raise tuf_exc.RepositoryError(f"director key list of {info.length} bytes is too large")
        if info.hashes.get("sha256") == self.keyring.stored_sha256():
            return False
        tmp = self.keyring.store.with_name(f".{self.keyring.store.name}.download")
        try:
            updater.download_target(info, filepath=str(tmp))
            data = tmp.read_bytes()
        finally:
            tmp.unlink(missing_ok=True)
        try:
            return self.keyring.apply(data)
        except InvalidPayload as exc:
            raise tuf_exc.RepositoryError(f"unusable director key list: {exc}") from None

    def lookup(self, target: str) -> TargetFile | None:
        """Refresh the metadata and return the listed TargetFile of ``target`` (None: unlisted).

        The same refresh syncs the director key list (:meth:`sync_director_keys`).
        """
        found: list[TargetFile | None] = []

        def get(updater: Updater) -> None:
            self._sync_keys(updater)
            found.append(updater.get_targetinfo(target))

        self._refreshed(get)
        return found[0]

    def listed_targets(self) -> dict[str, TargetFile]:
        """Refresh the metadata and return every target the top-level targets role lists.

        ngclient has no call that enumerates targets: the paths come from the ``targets.json`` that
        the refresh has just verified and stored in ``metadata_dir``, and each one's TargetFile from
        ``get_targetinfo`` on the refreshed updater (so nothing here is taken unverified)."""
        found: dict[str, TargetFile] = {}

        def collect(updater: Updater) -> None:
            signed = Metadata[Targets].from_file(str(self.metadata_dir / "targets.json")).signed
            paths: list[str] = list(signed.targets) if isinstance(signed, Targets) else []
            for path in paths:
                info = updater.get_targetinfo(path)
                if info is not None:
                    found[path] = info

        self._refreshed(collect)
        return found

    def _refreshed(self, use: Any) -> None:
        """Build an Updater, refresh it and call ``use(updater)``, mapping errors to rejections."""
        fetcher = HttpxFetcher(self.http, deadline_s=self.deadline_s, max_bytes=self.max_metadata_bytes)
        try:
            updater = Updater(
                str(self.metadata_dir),
                self.metadata_url,
                target_base_url=self.targets_url,
                fetcher=fetcher,
                config=UpdaterConfig(prefix_targets_with_hash=True),
                bootstrap=None,
            )
            updater.refresh()
            use(updater)
        except tuf_exc.DownloadError as exc:
            # a 404 of metadata that the chain says must exist, or metadata longer than its cap
            # (ngclient's max length or ours), is an attack or a broken repo; timeouts, refused
            # connections and 5xx are an outage worth retrying
            status = getattr(exc, "status_code", None)
            if isinstance(exc, tuf_exc.DownloadLengthMismatchError) or (status is not None and status < 500):
                raise RepositoryError(f"metadata download failed: {exc}") from None
            raise RepositoryUnavailable(f"repository unreachable: {exc}") from None
        except (tuf_exc.RepositoryError, OSError, ValueError) as exc:
            raise RepositoryError(f"TUF refresh failed: {exc.__class__.__name__}: {exc}") from None
        finally:
            fetcher.close()

    def check(self, desired: DesiredState) -> TargetFile:
        """The repository's TargetFile for ``desired.target`` if it matches; else :class:`Rejected`."""
        try:
            info = self.lookup(desired.target)
        except Rejected as exc:
            exc.seq, exc.authentic = desired.seq, True
            raise
        if info is None:
            raise TargetNotListed(
                f"{desired.target!r} is not listed by the image repository (unpublished or revoked)",
                seq=desired.seq,
                authentic=True,
            )
        problems: list[str] = []
        if info.length != desired.length:
            problems.append(f"length {info.length} != {desired.length}")
        if info.hashes.get("sha256") != desired.hashes.get("sha256"):
            problems.append("sha256 differs")
        for algo, value in desired.hashes.items():
            if algo in info.hashes and info.hashes[algo] != value:
                problems.append(f"{algo} differs")
        custom = info.custom if isinstance(info.custom, dict) else {}
        for field in ("model", "version", "release", "variant"):
            if custom.get(field) != getattr(desired, field):
                problems.append(f"custom {field} {custom.get(field)!r} != {getattr(desired, field)!r}")
        if problems:
            raise TargetMismatch(
                f"{desired.target!r}: the image repository disagrees: " + "; ".join(sorted(set(problems))),
                seq=desired.seq,
                authentic=True,
            )
        return info

    def url(self, desired: DesiredState) -> str:
        return target_url(self.targets_url, desired.target, desired.hashes["sha256"])
