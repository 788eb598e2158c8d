"""Daemon decisions that need no server: a bare ``Daemon`` with only the attributes under test."""

from __future__ import annotations

import json
import queue
import threading
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_client.daemon import Daemon
from device_client.protocol import DesiredState
from device_client.protocol.signing import sign_envelope
from device_client.state import DeviceState, accept

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
