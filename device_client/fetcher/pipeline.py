"""The hashing pipeline of a bundle download: the received bytes are hashed and written, in order,
on threads of their own (:class:`HashWriter`), so receiving, hashing and writing overlap."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from .settings import Deadline

_FSYNC_EVERY = 16 * 1024 * 1024
#: the bundle download's buffers: BLOCKS blocks of BLOCK_BYTES in flight between the receiving
#: thread and the hash and write threads
BLOCK_BYTES = 1024 * 1024
BLOCKS = 4


def hash_prefix(path: Path, length: int) -> hashlib._Hash:
    """The SHA-256 state after the first ``length`` bytes of ``path`` (the prefix a resume keeps)."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(BLOCK_BYTES))
    with open(path, "rb", buffering=0) as fh:
        remaining = length
        while remaining > 0:
            n = fh.readinto(buf[: min(len(buf), remaining)])
            if not n:
                break
            h.update(buf[:n])
            remaining -= n
    return h


_Span = tuple[int, int, int]  # (block, start, end)
_NOTHING: _Span = (-1, 0, 0)


def _merged(q: queue.SimpleQueue[_Span | None]) -> Iterator[_Span]:
    """The spans put on ``q`` up to a None, adjacent ones (same block, end to start) merged."""
    item: _Span | None = q.get()
    while item is not None:
        block, first, end = item
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                item = _NOTHING
                break
            if item is None or item[0] != block or item[1] != end:
                break
            end = item[2]
        yield block, first, end
        if item is _NOTHING:
            item = q.get()


class HashWriter:
    """Hashes and writes the received bytes, in order, on threads of its own.

    The receiving thread reads the socket straight into blocks of a fixed pool (:meth:`take`) and
    hands every received span over (:meth:`put`): the hash thread hashes spans and passes them on,
    the write thread writes them and returns a block to the pool once it has written it to its
    end, and every ``_FSYNC_EVERY`` bytes asks the fsync thread to sync (disk writeback overlaps the
    download and little is left for the final fsync). Adjacent spans are merged, so the threads work
    on up to a block at a time however small the reads are. ``hashlib`` and file writes release the
    GIL on large buffers, so receiving, hashing and writing run in parallel with no copies between
    them. Bounded: a receiver that is ahead waits in :meth:`take` for a free block.

    The write thread owns ``fd`` and closes it when it ends, so a receiver that gives up waiting
    in :meth:`close` can never leave a thread writing to a closed (or reused) descriptor.

    An error in a thread (an ``OSError`` such as ENOSPC from a write) is kept and raised in the
    receiving thread by its next :meth:`take` or by :meth:`close`; a failed thread keeps passing
    blocks on, so the receiver never waits forever.
    """

    def __init__(
        self, fd: int, h: hashlib._Hash, *, block_bytes: int = BLOCK_BYTES, blocks: int = BLOCKS
    ) -> None:
        self.fd = fd
        self.hash = h
        self.error: BaseException | None = None
        self._raised = False
        self._closed = False
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._to_hash: queue.SimpleQueue[_Span | None] = queue.SimpleQueue()
        self._to_write: queue.SimpleQueue[_Span | None] = queue.SimpleQueue()
        self._sync_due = threading.Event()
        self._writing = True
        self._hasher = threading.Thread(target=self._hash_loop, name="download-hash", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="download-write", daemon=True)
        self._syncer = threading.Thread(target=self._sync_loop, name="download-fsync", daemon=True)
        try:
            self.views = [memoryview(bytearray(block_bytes)) for _ in range(blocks)]
            for i in range(blocks):
                self._free.put(i)
            self._syncer.start()
            self._hasher.start()
            self._writer.start()  # from here on it closes fd
        except BaseException:  # no write thread: stop the others, close fd here
            self._writing = False
            self._sync_due.set()
            self._to_hash.put(None)
            os.close(fd)
            raise

    def take(self, deadline: Deadline, url: str) -> int:
        """A free block (waiting for the write thread within the deadline)."""
        while True:
            self._raise()
            try:
                return self._free.get(timeout=max(deadline.remaining(), 0.001))
            except queue.Empty:
                deadline.check(url)

    def put(self, block: int, start: int, end: int) -> None:
        self._to_hash.put((block, start, end))

    def close(self) -> None:
        """Wait until every span handed over is hashed and written; raise a thread's error."""
        if not self._closed:
            self._closed = True
            self._to_hash.put(None)
            self._hasher.join()
            self._writer.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None and not self._raised:
            self._raised = True  # once: close() after a failed take() does not raise it again
            raise self.error

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

    def _hash_loop(self) -> None:
        try:
            for span in _merged(self._to_hash):
                if self.error is None:
                    block, start, end = span
                    try:
                        self.hash.update(self.views[block][start:end])
                    except BaseException as exc:  # handed to the receiving thread
                        self._fail(exc)
                self._to_write.put(span)
        finally:
            self._to_write.put(None)

    def _write_loop(self) -> None:
        try:
            since_sync = 0
            for block, start, end in _merged(self._to_write):
                if self.error is None:
                    try:
                        data = self.views[block][start:end]
                        while data:
                            data = data[os.write(self.fd, data) :]
                        since_sync += end - start
                        if since_sync >= _FSYNC_EVERY:
                            self._sync_due.set()
                            since_sync = 0
                    except BaseException as exc:  # handed to the receiving thread
                        self._fail(exc)
                if end == len(self.views[block]):
                    self._free.put(block)
        finally:
            self._writing = False
            self._sync_due.set()
            self._syncer.join()
            os.close(self.fd)

    def _sync_loop(self) -> None:
        while True:
            self._sync_due.wait()
            self._sync_due.clear()
            if not self._writing:
                return
            try:
                os.fsync(self.fd)
            except BaseException as exc:  # handed to the receiving thread
                self._fail(exc)
                return
