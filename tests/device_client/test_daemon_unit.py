"""Daemon decisions that need no server: the daemon's parts under test, with bare stand-ins for the
others."""

from __future__ import annotations

import errno
import json
import logging
import threading
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_client.daemon.intake import Intake
from device_client.daemon.persistence import StateKeeper
from device_client.daemon.updater import Updater
from device_client.daemon.worker import Worker
from device_client.protocol import DesiredState
from device_client.protocol.signing import sign_envelope
from device_client.state import DeviceState, UpdatePhase, accept, fail
from device_client.store import DiskFull, StateStore

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


def keeper_of(state: DeviceState, store: StateStore | None = None) -> StateKeeper:
    keeper = StateKeeper(store)  # type: ignore[arg-type]  (without a store where nothing is saved)
    keeper.state = state
    return keeper


def bare_intake(state: DeviceState) -> Intake:
    """What paho's thread uses: the device id, the director keys and the state."""
    return Intake(
        device_id="dev-1",
        settings=None,  # type: ignore[arg-type]
        keyring=SimpleNamespace(keys=[KEY.public_key()]),  # type: ignore[arg-type]
        tuf=None,  # type: ignore[arg-type]
        keeper=keeper_of(state),
        reporter=None,  # type: ignore[arg-type]
        slots=None,  # type: ignore[arg-type]
    )


def bare_worker(keeper: StateKeeper, *, updater: Any = None, reporter: Any = None) -> Worker:
    return Worker(
        settings=None,  # type: ignore[arg-type]
        keeper=keeper,
        intake=None,  # type: ignore[arg-type]
        updater=updater,
        probation=SimpleNamespace(pending=None),  # type: ignore[arg-type]
        reporter=reporter,
        stop=threading.Event(),
    )


def test_redelivered_reissue_does_not_interrupt_the_download() -> None:
    first, _ = signed(5)
    downloading = accept(DeviceState(), first, datetime.now(UTC), "downloads/clf.tar.partial")
    # the same target re-issued as seq 6 while downloading: accepted without a new update
    state = downloading.model_copy(update={"last_desired_seq": 6})
    intake = bare_intake(state)
    _, reissue = signed(6)
    intake.on_desired("fleet/devices/dev-1/desired", reissue)  # the retained copy, after a reconnect
    assert intake.inbox.qsize() == 1  # queued: the worker ignores it as a duplicate
    assert not intake.supersede.is_set()
    _, newer = signed(7)
    intake.on_desired("fleet/devices/dev-1/desired", newer)  # a genuinely newer one does interrupt
    assert intake.supersede.is_set()


def test_redelivered_rejected_state_does_not_interrupt_the_download() -> None:
    first, _ = signed(5)
    downloading = accept(DeviceState(), first, datetime.now(UTC), "downloads/clf.tar.partial")
    # seq 7 arrived during the download and was rejected (e.g. a release below the floor)
    intake = bare_intake(downloading.model_copy(update={"last_rejected_seq": 7}))
    _, rejected = signed(7)
    intake.on_desired("fleet/devices/dev-1/desired", rejected)  # the retained copy, after a reconnect
    assert intake.inbox.qsize() == 1  # queued: the worker ignores it as already rejected
    assert not intake.supersede.is_set()
    _, newer = signed(8)
    intake.on_desired("fleet/devices/dev-1/desired", newer)
    assert intake.supersede.is_set()


def test_a_plain_enospc_oserror_fails_the_update_as_disk_full_and_frees_the_download(tmp_path) -> None:
    """Not only the store's DiskFull: an OSError with a disk-full errno (e.g. from the report
    journal's atomic write) fails the update as disk_full, which deletes the download."""
    first, _ = signed(5)
    partial = tmp_path / "downloads" / "clf.tar.partial"
    partial.parent.mkdir()
    partial.write_bytes(b"x" * 100)
    keeper = keeper_of(
        accept(DeviceState(), first, datetime.now(UTC), "downloads/clf.tar.partial"), StateStore(tmp_path)
    )
    advanced: list[DeviceState] = []
    reporter = SimpleNamespace(advance=lambda state, details=None: advanced.append(state))
    updater = Updater(
        settings=None,  # type: ignore[arg-type]
        targets_url="",
        http=None,  # type: ignore[arg-type]
        keeper=keeper,
        reporter=reporter,  # type: ignore[arg-type]
        slots=None,  # type: ignore[arg-type]
        stop=threading.Event(),
        supersede=threading.Event(),
    )

    def download() -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    updater.download = download  # type: ignore[method-assign]
    bare_worker(keeper, updater=updater, reporter=reporter).step()
    assert advanced
    assert advanced[0].phase is UpdatePhase.failed
    assert advanced[0].update.reason.startswith("disk_full"), advanced[0].update.reason
    assert not partial.exists()


def test_an_outcome_that_cannot_be_saved_warns_once_and_backs_off(caplog) -> None:
    """A retry-only step (an outcome to report, a breach to revert) whose save fails is retried
    quietly: one warning line, no traceback per tick, and the worker does not see an exception."""
    first, _ = signed(5)
    downloading = accept(DeviceState(), first, datetime.now(UTC), "downloads/clf.tar.partial")
    full = [True]

    def finish_outcome(details=None) -> None:
        if full[0]:
            raise DiskFull("saving state", OSError(errno.ENOSPC, "No space left on device"))

    keeper = keeper_of(fail(downloading, datetime.now(UTC), "verify: bad hash"))
    worker = bare_worker(keeper, reporter=SimpleNamespace(finish_outcome=finish_outcome))
    worker.stop.wait = lambda timeout=None: False  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG, logger="device_client.daemon")
    for _ in range(3):
        worker.step()  # raised to the worker before, which logged a traceback every tick
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].exc_info is None
    full[0] = False
    worker.step()
    assert worker.save_warned is False  # the next failure warns again
