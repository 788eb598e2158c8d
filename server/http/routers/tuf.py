"""The TUF image repository over HTTP, read-only: ``/tuf/metadata/`` and ``/tuf/targets/``.

Metadata is public: it is signed, carries no secrets, and devices must be able to refresh it
before they can trust anything else. Only TUF metadata file names are served
(``timestamp.json``, ``root.json``, ``N.root.json``, ``N.targets.json``, ``N.snapshot.json``);
anything else is a 404.

Targets (the model bundles) need a bearer token. Who may download:

* an enrolled device with its device token (``fd.<device_id>.<secret>``, handed out at enrollment);
  a decommissioned device gets 403. Any enrolled device may fetch any published bundle: bundles
  are integrity-protected by TUF and the director decides what a device installs, so the token
  keeps the artifacts away from the anonymous internet and makes every download attributable to a
  device; it is not a per-assignment entitlement;
* an admin API token of any role: ``cloud`` (the identity of `fleet cloud serve`, which installs
  bundles like a device) and up, so operators can fetch and inspect bundles too.

Targets are served by their consistent-snapshot names (``<dir>/<sha256>.<basename>``), exactly as
``tuf.ngclient`` asks for them, with single-range ``Range`` support for resumable downloads
(``bytes=N-``, ``bytes=N-M``, ``bytes=-S``: 206 with ``Content-Range``; 416 with
``Content-Range: bytes */size`` when unsatisfiable; multi-range or malformed ranges get the whole
file, as RFC 9110 allows). ``If-Range`` with a stale validator also gets the whole file. Files are
streamed from disk in chunks. Paths are checked segment by segment and must resolve inside the
repository's ``targets/`` directory; symlinks are not followed.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.orm import Session

from server.admin.schemas import Principal
from server.admin.tables import Role
from server.devices.tables import Device
from server.errors import NotFound, Unauthorized
from server.http.deps import SessionDep, get_ctx, require_device, require_role
from server.security import ADMIN_PREFIX, DEVICE_PREFIX
from server.trust.repository import InvalidTargetPath, check_target_path

router = APIRouter(tags=["tuf"])

#: both matched with ``fullmatch`` (``match`` with ``$`` lets a final newline through)
METADATA_NAME_RE = re.compile(
    r"(?:(?:[1-9][0-9]{0,9})\.(?:root|targets|snapshot)|timestamp|root)\.json", re.ASCII
)
_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII)
#: byte positions past this are all "beyond any file"; bounds int() (4,300-digit limit, a 500)
_RANGE_POS_CAP = 2**63
CHUNK_BYTES = 1024 * 1024


def _downloader(request: Request, session: Session = SessionDep) -> Device | Principal:
    """A device by its device token, or an admin token of any role (``cloud`` and up); 401/403
    otherwise."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    prefix = token.strip().split(".", 1)[0]
    if scheme.lower() == "bearer" and prefix == DEVICE_PREFIX:
        return require_device(request, session)
    if scheme.lower() == "bearer" and prefix == ADMIN_PREFIX:
        return require_role(Role.cloud)(request, session)
    raise Unauthorized("a device token or an admin token is required to download targets")


Downloader = Depends(_downloader)


@router.get("/tuf/metadata/{filename}")
def metadata(filename: str, request: Request) -> Response:
    """A TUF metadata file (public)."""
    if not METADATA_NAME_RE.fullmatch(filename):
        raise NotFound(f"no metadata file {filename!r}")
    path = get_ctx(request).repo.metadata_dir / filename
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise NotFound(f"no metadata file {filename!r}") from None
    return Response(data, media_type="application/json", headers={"Cache-Control": "no-cache"})


def _resolve_target(targets_dir: Path, path: str) -> tuple[int, os.stat_result]:
    """An open read-only descriptor of the target file ``path`` and its stat; NotFound otherwise."""
    try:
        check_target_path(path)
    except InvalidTargetPath:
        raise NotFound("no such target") from None
    full = targets_dir / path
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        raise NotFound("no such target") from None
    st = os.fstat(fd)
    real = Path(os.path.realpath(full))
    if not stat.S_ISREG(st.st_mode) or not real.is_relative_to(os.path.realpath(targets_dir)):
        os.close(fd)
        raise NotFound("no such target")
    return fd, st


def _range_pos(digits: str) -> int:
    """A Range byte position; absurdly long ones saturate at :data:`_RANGE_POS_CAP`."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else _RANGE_POS_CAP


class RangeNotSatisfiable(Exception):
    """The requested range starts beyond the end of the file (416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range ``(first, last)`` a ``Range`` header asks of ``size`` bytes.

    None means "serve the whole file" (no header, malformed or multi-range);
    :class:`RangeNotSatisfiable` means 416.
    """
    if not header:
        return None
    m = _RANGE_RE.fullmatch(header.strip().replace(" ", ""))
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        n = _range_pos(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - n), size - 1
    start = _range_pos(first)
    end = _range_pos(last) if last else size - 1
    if last and end < start:
        return None  # syntactically invalid: ignore (RFC 9110 14.1.1)
    if start >= size:
        raise RangeNotSatisfiable
    return start, min(end, size - 1)


def _stream(fd: int, start: int, length: int) -> Iterator[bytes]:
    try:
        left = length
        offset = start
        while left > 0:
            chunk = os.pread(fd, min(CHUNK_BYTES, left), offset)
            if not chunk:
                return
            left -= len(chunk)
            offset += len(chunk)
            yield chunk
    finally:
        os.close(fd)


@router.get("/tuf/targets/{path:path}")
def target(path: str, request: Request, _: Device | Principal = Downloader) -> Response:
    """A target file (a model bundle) by its consistent-snapshot name, with Range support."""
    fd, st = _resolve_target(get_ctx(request).repo.targets_dir, path)
    size = st.st_size
    etag = f'"{st.st_ino:x}-{size:x}-{st.st_mtime_ns:x}"'
    headers = {"Accept-Ranges": "bytes", "ETag": etag, "Cache-Control": "private, no-transform"}
    if_range = request.headers.get("if-range")
    range_header = request.headers.get("range") if if_range in (None, etag) else None
    try:
        wanted = parse_range(range_header, size)
    except RangeNotSatisfiable:
        os.close(fd)
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    if wanted is None:
        start, length, status = 0, size, 200
    else:
        start, end = wanted
        length, status = end - start + 1, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(length)
    return StreamingResponse(
        _stream(fd, start, length), status_code=status, media_type="application/octet-stream", headers=headers
    )
