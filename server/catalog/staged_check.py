"""The signer's check of staged targets before ``fleet model sign`` signs them.

Each bundle about to be listed is downloaded from the server and must be the one the staged
metadata describes: its length and sha256, a safe bundle whose members match its manifest, and the
manifest's name, version, release and variant equal to the target's custom fields. A server that
swapped a bundle after staging it gets nothing signed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from device_client.protocol.bundle import BundleError, extract_bundle, file_sha256

#: ``download(target, file)`` writes the stored bundle of a staged target into ``file``
Download = Callable[[dict[str, Any], BinaryIO], None]


class StagedBundleMismatch(Exception):
    """A bundle about to be listed is not what the staged metadata says: nothing may be signed."""


def check_staged_bundles(listed: list[dict[str, Any]], download: Download, workdir: Path) -> None:
    """Download each staged target of ``listed`` (``path``, ``file``, ``length``, ``sha256``,
    ``custom``) into the empty directory ``workdir`` and check it (:func:`check_staged_bundle`).
    Raises :class:`StagedBundleMismatch` at the first bundle that fails."""
    for n, target in enumerate(listed):
        path = workdir / f"{n}.tar"
        with open(path, "wb") as fh:
            download(target, fh)
        check_staged_bundle(target, path, workdir / f"{n}.d")


def check_staged_bundle(target: dict[str, Any], path: Path, extract_dir: Path) -> None:
    """Check the downloaded bundle ``path`` of a staged ``target``, extracting it into
    ``extract_dir``; raises :class:`StagedBundleMismatch`."""
    if file_sha256(path) != (target["length"], target["sha256"]):
        raise StagedBundleMismatch(
            f"{target['path']}: stored bundle differs from its staged length or sha256; not signed"
        )
    try:
        manifest = extract_bundle(path, extract_dir)
    except BundleError as exc:
        raise StagedBundleMismatch(f"{target['path']}: not a valid bundle ({exc}); nothing signed") from exc
    custom = target.get("custom", {})
    got = {"model": manifest.name, "version": manifest.version, "release": manifest.release,
           "variant": manifest.variant}  # fmt: skip
    want = {k: custom.get(k) for k in got}
    if got != want:
        raise StagedBundleMismatch(
            f"{target['path']}: its manifest says {got}, the target says {want}; nothing signed"
        )
