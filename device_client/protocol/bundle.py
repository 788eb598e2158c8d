"""The model bundle: one tar file listed as a TUF target (docs/architecture.md, "Model registry").

Members: ``bundle.json`` (first), ``model.onnx``, ``validation.npz`` and optional extras. Every
member other than ``bundle.json`` is listed in the manifest with its length and SHA-256, and
:func:`extract_bundle` refuses anything else: absolute or parent paths, sub-directories, links,
devices, unlisted members, and members over the size caps.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import BundleError
from .messages import MODEL_NAME_PATTERN, SEMVER_PATTERN, VARIANT_PATTERN, Payload

MANIFEST_MEMBER = "bundle.json"
MODEL_MEMBER = "model.onnx"
VALIDATION_MEMBER = "validation.npz"
#: matched with ``fullmatch`` (``match`` with ``$`` would let a final newline through)
MEMBER_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}", re.ASCII)
MAX_MANIFEST_BYTES = 1024 * 1024
DEFAULT_MAX_MEMBER_BYTES = 2 * 1024**3
DEFAULT_MAX_TOTAL_BYTES = 4 * 1024**3
_CHUNK = 1024 * 1024

#: onnxruntime tensor types -> the dtype strings of TensorSpec (numpy dtype names)
ORT_DTYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


class TensorSpec(BaseModel):
    """One input or output of the model: name, element type, shape (None/str = dynamic)."""

    model_config = ConfigDict(frozen=True)

    name: str
    dtype: str
    shape: list[int | str | None]


class ValidationSpec(BaseModel):
    """How the device compares its outputs on ``validation.npz`` with the recorded ones."""

    model_config = ConfigDict(frozen=True)

    rtol: float = Field(default=1e-3, ge=0)
    atol: float = Field(default=1e-4, ge=0)
    #: ``allclose`` compares every output element; ``top1`` compares the arg-max of the first output
    compare: Literal["allclose", "top1"] = "allclose"


class MemberInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    length: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class BundleManifest(Payload):
    """Contents of ``bundle.json``."""

    SCHEMA: ClassVar[str] = "fleet.bundle/1"

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    release: int = Field(ge=1)
    variant: str = Field(default="default", pattern=VARIANT_PATTERN)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: dict[str, Any] | str | None = None
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    members: dict[str, MemberInfo]
    created_at: datetime | None = None

    @field_validator("members")
    @classmethod
    def _member_names(cls, members: dict[str, MemberInfo]) -> dict[str, MemberInfo]:
        for name in members:
            if not MEMBER_NAME_RE.fullmatch(name) or name == MANIFEST_MEMBER:
                raise ValueError(f"invalid member name {name!r}")
        return members


def file_sha256(path: Path) -> tuple[int, str]:
    """(length, hex sha256) of a file, streamed."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def build_bundle(dest: Path, manifest_fields: dict[str, Any], files: dict[str, Path]) -> BundleManifest:
    """Write a bundle tar to ``dest`` from ``files`` (member name -> path).

    ``manifest_fields`` are the manifest's fields except ``members``, which is computed here.
    The tar is deterministic for the same inputs (fixed mtime, owner and order).
    """
    for name in files:
        if not MEMBER_NAME_RE.fullmatch(name) or name == MANIFEST_MEMBER:
            raise BundleError(f"invalid member name {name!r}")
    members = {}
    for name in sorted(files):
        length, digest = file_sha256(files[name])
        members[name] = MemberInfo(length=length, sha256=digest)
    manifest = BundleManifest.build(**manifest_fields, members=members)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, MANIFEST_MEMBER, json.dumps(manifest.to_dict(), indent=2).encode())
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = members[name].length
            info.mode = 0o644
            with open(files[name], "rb") as fh:
                tar.addfile(info, fh)
    os.replace(tmp, dest)
    return manifest


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith("/") or "\\" in name or ".." in name.split("/"):
        raise BundleError(f"unsafe member path {name!r}")
    if not member.isreg():
        kind = "link" if (member.issym() or member.islnk()) else "non-regular member"
        raise BundleError(f"bundle contains a {kind}: {name!r}")
    if "/" in name or not MEMBER_NAME_RE.fullmatch(name):
        raise BundleError(f"member name not allowed: {name!r}")


def read_manifest(tar: tarfile.TarFile) -> BundleManifest:
    try:
        member = tar.getmember(MANIFEST_MEMBER)
    except KeyError:
        raise BundleError("bundle has no bundle.json") from None
    _check_member(member)
    if member.size > MAX_MANIFEST_BYTES:
        raise BundleError("bundle.json is too large")
    fh = tar.extractfile(member)
    assert fh is not None  # a regular member always has a file object
    try:
        return BundleManifest.model_validate(json.loads(fh.read()))
    except (ValueError, ValidationError) as exc:
        raise BundleError(f"invalid bundle.json: {str(exc).splitlines()[0]}") from None


def extract_bundle(
    tar_path: Path,
    dest_dir: Path,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> BundleManifest:
    """Safely extract a bundle into the (new or empty) ``dest_dir`` and return its manifest.

    Every member is checked before a byte of it is written, and hashed while it is written.
    On any error the partially extracted files are removed and :class:`BundleError` is raised.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    if any(dest_dir.iterdir()):
        raise BundleError(f"extraction directory {dest_dir} is not empty")
    written: list[Path] = []
    try:
        try:
            tar = tarfile.open(tar_path, mode="r:")  # noqa: SIM115 - closed by the with below
        except (tarfile.TarError, OSError) as exc:
            raise BundleError(f"not a readable tar file: {exc}") from None
        with tar:
            try:
                members = tar.getmembers()
            except (tarfile.TarError, EOFError) as exc:
                raise BundleError(f"truncated or corrupt tar: {exc}") from None
            for m in members:
                _check_member(m)
            manifest = read_manifest(tar)
            names = [m.name for m in members if m.name != MANIFEST_MEMBER]
            if len(set(names)) != len(names):
                raise BundleError("bundle has duplicate members")
            unlisted = set(names) - set(manifest.members)
            if unlisted:
                raise BundleError(f"members not listed in bundle.json: {sorted(unlisted)}")
            missing = set(manifest.members) - set(names)
            if missing:
                raise BundleError(f"members listed in bundle.json but absent: {sorted(missing)}")
            for required in (MODEL_MEMBER, VALIDATION_MEMBER):
                if required not in manifest.members:
                    raise BundleError(f"bundle lacks {required}")
            total = 0
            for m in members:
                if m.name == MANIFEST_MEMBER:
                    continue
                info = manifest.members[m.name]
                if m.size != info.length:
                    raise BundleError(f"{m.name}: size {m.size} differs from bundle.json {info.length}")
                if m.size > max_member_bytes:
                    raise BundleError(f"{m.name}: {m.size} bytes exceeds the member cap {max_member_bytes}")
                total += m.size
                if total > max_total_bytes:
                    raise BundleError(f"bundle exceeds the total cap of {max_total_bytes} bytes")
                src = tar.extractfile(m)
                assert src is not None
                out = dest_dir / m.name
                written.append(out)
                h = hashlib.sha256()
                n = 0
                with open(out, "xb") as fh:
                    while chunk := src.read(_CHUNK):
                        n += len(chunk)
                        if n > m.size:
                            raise BundleError(f"{m.name}: more data than declared")
                        h.update(chunk)
                        fh.write(chunk)
                if n != info.length or h.hexdigest() != info.sha256:
                    raise BundleError(f"{m.name}: content does not match bundle.json hash")
            (dest_dir / MANIFEST_MEMBER).write_text(json.dumps(manifest.to_dict(), indent=2))
            return manifest
    except (BundleError, OSError, tarfile.TarError, EOFError) as exc:
        for path in [*written, dest_dir / MANIFEST_MEMBER]:
            path.unlink(missing_ok=True)
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"extraction failed: {exc}") from exc
