"""Cloud answers kept on the device's disk, so that a cached cloud answer can stand in for the
cloud when it cannot be asked (offline, open breaker, spent budget).

Keyed by (cloud model, version, SHA-256 of the exact bytes sent, dtypes and shapes included); one
file per answer, checksummed, written atomically; a TTL and a byte cap with LRU eviction. It
survives restarts; a corrupted file is dropped and rebuilt by the next answer; a full disk only
skips writes. Nothing here raises into the request path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from ..protocol.fsutil import atomic_write

log = logging.getLogger(__name__)

MAGIC = b"fleetota-answer/1\n"
SUFFIX = ".ans"
_ENTRY_RE = re.compile(r"[0-9a-f]{64}\.ans", re.ASCII)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: an entry stamped further in the future than this (the clock went back) is not trusted
CLOCK_SLACK_S = 60.0
_NUMERIC_KINDS = "biuf"


class PutResult(StrEnum):
    stored = "stored"
    disabled = "disabled"
    too_large = "too_large"
    disk_full = "disk_full"
    failed = "failed"


@dataclass(frozen=True)
class CachedAnswer:
    outputs: dict[str, np.ndarray]
    model_version: str | None
    stored_at: float


def tensor_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the exact tensors: names, dtypes (byte order included), shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype.kind not in _NUMERIC_KINDS:  # objects would hash by address
            raise ValueError(f"tensor {name!r} of dtype {arr.dtype} has no stable bytes")
        head = json.dumps([name, arr.dtype.str, list(arr.shape)]).encode()
        h.update(len(head).to_bytes(4, "big") + head)
        h.update(arr.nbytes.to_bytes(8, "big"))
        h.update(arr.data.cast("B") if arr.nbytes else b"")
    return h.hexdigest()


def cache_key(model: str, version: str | None, tensors: Mapping[str, np.ndarray]) -> str:
    """The key of the cloud answer of ``model`` (``version``; None: its active one) to ``tensors``."""
    return hashlib.sha256(json.dumps([model, version or "", tensor_digest(tensors)]).encode()).hexdigest()


def encode_entry(key: str, outputs: Mapping[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    arrays = {n: np.ascontiguousarray(a) for n, a in outputs.items()}
    for name, arr in arrays.items():
        if arr.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"output {name!r} of dtype {arr.dtype} cannot be cached")
    head = dict(meta, key=key, tensors=[[n, a.dtype.str, list(a.shape)] for n, a in arrays.items()])
    body = json.dumps(head).encode() + b"\n" + b"".join(a.tobytes() for a in arrays.values())
    return MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def decode_entry(key: str, data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and outputs of an entry; ValueError when anything about it is off."""
    if not data.startswith(MAGIC):
        raise ValueError("not a cache entry")
    rest = data[len(MAGIC) :]
    digest, body = rest[:64], rest[65:]
    if rest[64:65] != b"\n" or hashlib.sha256(body).hexdigest().encode() != digest:
        raise ValueError("checksum mismatch")
    head_line, _, raw = body.partition(b"\n")
    head = json.loads(head_line)
    if not isinstance(head, dict) or head.get("key") != key:
        raise ValueError("entry is for another key")
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for name, dtype_str, shape in head["tensors"]:
        dtype = np.dtype(dtype_str)
        if dtype.kind not in _NUMERIC_KINDS or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError("bad tensor header")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        chunk = raw[offset : offset + nbytes]
        if len(chunk) != nbytes:
            raise ValueError("truncated tensor")
        outputs[str(name)] = np.frombuffer(chunk, dtype=dtype).reshape(shape).copy()
        offset += nbytes
    if offset != len(raw):
        raise ValueError("trailing bytes")
    return head, outputs


class AnswerCache:
    """The on-disk cache of one edge model's cloud answers (``max_bytes`` 0: off)."""

    def __init__(
        self, directory: Path, *, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._index: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (bytes, stored_at)
        self._total = 0
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "hits",
                "misses",
                "expired",
                "corrupted",
                "stored",
                "too_large",
                "disk_full",
                "write_failed",
                "evicted",
            ),
            0,
        )
        self.enabled = max_bytes > 0 and ttl_s > 0
        if self.enabled:
            try:
                self._scan()
            except OSError as exc:
                log.warning("cloud answer cache at %s is unusable, running without it: %s", directory, exc)
                self.enabled = False

    # ------------------------------------------------------------------ start-up

    def _scan(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        now = self._clock()
        found: list[tuple[float, str, int]] = []
        with os.scandir(self.directory) as it:
            for entry in it:
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    self._unlink(Path(entry.path))  # a write a crash interrupted
                elif _ENTRY_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if self._fresh(st.st_mtime, now):
                        found.append((st.st_mtime, entry.name[: -len(SUFFIX)], st.st_size))
                    else:
                        self._unlink(Path(entry.path))
        for stored_at, key, size in sorted(found):
            self._index[key] = (size, stored_at)
            self._total += size
        with self._lock:
            self._evict()

    # ------------------------------------------------------------------ request path

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def _fresh(self, stored_at: float, now: float) -> bool:
        return stored_at <= now + CLOCK_SLACK_S and now - stored_at < self.ttl_s

    def get(self, key: str) -> CachedAnswer | None:
        """The fresh cloud answer stored under ``key``, or None (never raises)."""
        if not self.enabled:
            return None
        with self._lock:
            meta = self._index.get(key)
            if meta is None:
                self._counters["misses"] += 1
                return None
            if not self._fresh(meta[1], self._clock()):
                self._drop(key)
                self._counters["expired"] += 1
                return None
            self._index.move_to_end(key)
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as fh:
                size = os.fstat(fd).st_size
                if size > self.max_bytes:
                    raise ValueError(f"{size} bytes, over the cache's {self.max_bytes}")
                data = fh.read(size + 1)
            head, outputs = decode_entry(key, data)
            version = head.get("model_version")
            stored_at = float(head["stored_at"])
            if not self._fresh(stored_at, self._clock()):
                raise ValueError("expired by its own stamp")
        except FileNotFoundError:
            with self._lock:
                self._forget(key)
                self._counters["misses"] += 1
            return None
        except Exception as exc:  # a bad file of any kind is a miss, and is removed
            log.warning("cloud answer cache: dropping entry %s: %s", key[:12], exc)
            with self._lock:
                self._drop(key)
                self._counters["corrupted"] += 1
            return None
        with self._lock:
            self._counters["hits"] += 1
        return CachedAnswer(outputs, version if isinstance(version, str) else None, stored_at)

    def put(
        self,
        key: str,
        outputs: Mapping[str, np.ndarray],
        *,
        model: str,
        version: str | None,
        model_version: str | None,
    ) -> PutResult:
        """Store a cloud answer; what happened, never an exception (a full disk: ``disk_full``)."""
        if not self.enabled:
            return PutResult.disabled
        stored_at = self._clock()
        try:
            data = encode_entry(
                key,
                outputs,
                {"model": model, "version": version, "model_version": model_version, "stored_at": stored_at},
            )
        except (ValueError, TypeError) as exc:
            log.warning("cloud answer cache: cannot store an answer: %s", exc)
            return self._count(PutResult.failed)
        if len(data) > self.max_bytes:
            return self._count(PutResult.too_large)
        path = self._path(key)
        try:
            atomic_write(path, data, mode=0o600)
            os.utime(path, (stored_at, stored_at), follow_symlinks=False)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                log.warning("cloud answer cache: disk full, answer not stored")
                return self._count(PutResult.disk_full)
            log.warning("cloud answer cache: cannot write %s: %s", path, exc)
            return self._count(PutResult.failed)
        with self._lock:
            self._forget(key)
            self._index[key] = (len(data), stored_at)
            self._total += len(data)
            self._evict()
        return self._count(PutResult.stored)

    # ------------------------------------------------------------------ bookkeeping

    def _count(self, result: PutResult) -> PutResult:
        name = {PutResult.failed: "write_failed"}.get(result, result.value)
        with self._lock:
            self._counters[name] += 1
        return result

    def _forget(self, key: str) -> None:
        meta = self._index.pop(key, None)
        if meta is not None:
            self._total -= meta[0]

    def _drop(self, key: str) -> None:
        self._forget(key)
        self._unlink(self._path(key))

    def _evict(self) -> None:
        while self._total > self.max_bytes and self._index:
            key = next(iter(self._index))
            self._drop(key)
            self._counters["evicted"] += 1

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def counters(self) -> dict[str, int]:
        """Cumulative counts since start (hits, misses, expired, corrupted, stored, too_large,
        disk_full, write_failed, evicted)."""
        with self._lock:
            return dict(self._counters)
