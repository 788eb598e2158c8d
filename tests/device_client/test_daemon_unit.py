"""Daemon decisions that need no server: a bare ``Daemon`` with only the attributes under test."""

from __future__ import annotations

import errno
import json
import logging
import queue
import threading
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_client.daemon import Daemon
from device_client.protocol import DesiredState
from device_client.protocol.signing import sign_envelope
from device_client.state import DeviceState, UpdatePhase, accept, fail
from device_client.store import DiskFull

KEY = Ed25519PrivateKey.generate()
SHA = "ab" * 32


def signed(seq: int) -> tuple[DesiredState, bytes]:
    now = datetime.now(UTC)
    desired = DesiredState.build(
        device_id="dev-1",
        seq=seq,
        issued_at=now - timedelta(minutes=1),
        expires_at=now + timedelta(days=1),
        model="clf",
        version="2.0.0",
        release=2,
        target="clf/2.0.0/default/bundle.tar",
        length=100,
        hashes={"sha256": SHA},
    )
    return desired, json.dumps(sign_envelope(desired.to_dict(), KEY)).encode()


def bare_daemon(state: DeviceState) -> Daemon:
    daemon = object.__new__(Daemon)
    daemon.device_id = "dev-1"
    daemon.keyring = SimpleNamespace(keys=[KEY.public_key()])  # type: ignore[assignment]
    daemon.state = state
    daemon._inbox = queue.Queue()
    daemon._supersede = threading.Event()
    return daemon


def test_redelivered_reissue_does_not_interrupt_the_download() -> None:
    first, _ = signed(5)
    downloading = accept(DeviceState(), first, datetime.now(UTC), "downloads/clf.tar.partial")
    # the same target re-issued as seq 6 while downloading: accepted without a new update
    state = downloading.model_copy(update={"last_desired_seq": 6})
    daemon = bare_daemon(state)
    _, reissue = signed(6)
    daemon._on_desired("fleet/devices/dev-1/desired", reissue)  # the retained copy, after a reconnect
    assert daemon._inbox.qsize() == 1  # queued: the worker ignores it as a duplicate
    assert not daemon._supersede.is_set()
    _, newer = signed(7)
    daemon._on_desired("fleet/devices/dev-1/desired", newer)  # a genuinely newer one does interrupt
    assert daemon._supersede.is_set()


def test_redelivered_rejected_state_does_not_interrupt_the_download() -> None:
    first, _ = signed(5)
    downloading = accept(DeviceState(), first, datetime.now(UTC), "downloads/clf.tar.partial")
    # seq 7 arrived during the download and was rejected (e.g. a release below the floor)
    daemon = bare_daemon(downloading.model_copy(update={"last_rejected_seq": 7}))
    _, rejected = signed(7)
    daemon._on_desired("fleet/devices/dev-1/desired", rejected)  # the retained copy, after a reconnect
    assert daemon._inbox.qsize() == 1  # queued: the worker ignores it as already rejected
    assert not daemon._supersede.is_set()
    _, newer = signed(8)
    daemon._on_desired("fleet/devices/dev-1/desired", newer)
    assert daemon._supersede.is_set()


def test_a_plain_enospc_oserror_fails_the_update_as_disk_full_and_frees_the_download(tmp_path) -> None:
    """Not only the store's DiskFull: an OSError with a disk-full errno (e.g. from the report
    journal's atomic write) fails the update as disk_full, which deletes the download."""
    first, _ = signed(5)
    daemon = bare_daemon(accept(DeviceState(), first, datetime.now(UTC), "downloads/clf.tar.partial"))
    daemon.data_dir = tmp_path
    partial = tmp_path / "downloads" / "clf.tar.partial"
    partial.parent.mkdir()
    partial.write_bytes(b"x" * 100)
    advanced: list[DeviceState] = []
    daemon._advance = lambda state, details=None: advanced.append(state)  # type: ignore[method-assign]

    def download() -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    daemon._download = download  # type: ignore[method-assign]
    daemon._step()
    assert advanced
    assert advanced[0].phase is UpdatePhase.failed
    assert advanced[0].update.reason.startswith("disk_full"), advanced[0].update.reason
    assert not partial.exists()


def test_an_outcome_that_cannot_be_saved_warns_once_and_backs_off(caplog) -> None:
    """A retry-only step (an outcome to report, a breach to revert) whose save fails is retried
    quietly: one warning line, no traceback per tick, and the worker does not see an exception."""
    first, _ = signed(5)
    downloading = accept(DeviceState(), first, datetime.now(UTC), "downloads/clf.tar.partial")
    daemon = bare_daemon(fail(downloading, datetime.now(UTC), "verify: bad hash"))
    daemon._stop = threading.Event()
    daemon._stop.wait = lambda timeout=None: False  # type: ignore[method-assign]
    daemon._pending_breach = None
    daemon._unsaved = False
    daemon._save_warned = False
    full = [True]

    def finish_outcome(details=None) -> None:
        if full[0]:
            raise DiskFull("saving state", OSError(errno.ENOSPC, "No space left on device"))

    daemon._finish_outcome = finish_outcome  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG, logger="device_client.daemon")
    for _ in range(3):
        daemon._step()  # raised to the worker before, which logged a traceback every tick
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].exc_info is None
    full[0] = False
    daemon._step()
    assert daemon._save_warned is False  # the next failure warns again
