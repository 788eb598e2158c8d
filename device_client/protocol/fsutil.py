"""Crash-safe file writes shared by both sides: temp file, fsync, ``os.replace``, directory fsync.

Temp files get a random name and are created with ``O_CREAT|O_EXCL|O_NOFOLLOW``, so nothing
planted at a temp path (a symlink to a file elsewhere) is ever followed or written through; and
directories holding secrets are kept 0700 with their secret files 0600.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

#: a new file only: O_EXCL fails on anything already there, a symlink included (never followed)
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_temp(path: Path, mode: int = 0o644) -> tuple[int, Path]:
    """A new, empty file beside ``path`` (``.<name>.<random>.tmp``) open for writing, with exactly
    ``mode`` from the start (whatever the umask): ``(fd, temp path)``. It is never an existing file
    or link."""
    for _ in range(16):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, _CREATE_NEW, mode)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits away; the mode is what was asked
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return fd, tmp
    raise FileExistsError(f"no free temp name beside {path}")


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new content.

    The temp file (:func:`create_temp`) has ``mode`` from the start, so a secret is never readable
    by others even for a moment; ``os.replace`` swaps in the file itself, so a symlink at ``path``
    is replaced, never written through. A crash mid-write may leave a hidden ``.tmp`` behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def restrict_mode(path: Path, mode: int) -> str | None:
    """Take from ``path`` every permission bit ``mode`` does not grant; a line saying what changed
    (or why it could not: a file of another owner, a read-only mount), None if nothing had to. A
    symlink is left alone (its target is not ours to change)."""
    st = os.lstat(path)
    old = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode) or old & ~mode == 0:
        return None
    try:
        os.chmod(path, old & mode)
    except OSError as exc:
        return f"{path}: {old:o}, cannot tighten it to {old & mode:o} ({exc.strerror})"
    return f"{path}: {old:o} -> {old & mode:o}"


def private_dir(path: Path, secret_files: Iterable[str] = ()) -> list[str]:
    """Create ``path`` 0700, or tighten an existing one to at most 0700 and the files in it that
    match the glob patterns ``secret_files`` to at most 0600; one line per change made (or not
    possible)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    changes = [restrict_mode(path, 0o700)]
    for pattern in secret_files:
        changes += [restrict_mode(f, 0o600) for f in sorted(path.glob(pattern)) if f.is_file()]
    return [c for c in changes if c is not None]
