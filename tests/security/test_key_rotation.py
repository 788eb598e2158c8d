"""Director key rotation without re-enrolling, end to end: a real server (uvicorn + Mosquitto), real
device daemons, the rotation done by ``server.trust.rotation`` on the server's own key directory
while the server runs (exactly what ``fleet keys rotate director`` does from another process).

* after the rotation the running server signs with the new key; a device enrolled with the old key
  refreshes the director key list through TUF, installs the next version, and never re-enrolls;
* after ``retire-director`` the stolen old key no longer works: a DesiredState it signs for a
  listed, valid target is refused (``bad_signature``) both by a device that knows the new key and
  by a device that slept through the whole rotation and still has only the old key pinned.
"""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest

from device_client.daemon import Daemon
from device_client.protocol import DesiredState
from device_client.protocol.messages import utcnow
from device_client.protocol.signing import key_id, sign_envelope
from server.trust.rotation import retire_director_key, rotate_director
from tests.helpers.device_fleet import (
    ServerPublisher,
    assign,
    device_settings,
    enroll_device,
    infer,
    outcome_for,
    push_model,
    serving_version,
    wait_event,
)
from tests.helpers.onnx_models import make_model

pytestmark = pytest.mark.mqtt

QUICK = {"seconds": 0.2, "min_requests": 0}
X = np.random.default_rng(11).random((1, 4), dtype=np.float32)


def _signed_by(key, live, device_id: str, seq: int, version: str) -> bytes:
    """A DesiredState for the listed clf ``version``, correct in every field, signed by ``key``."""
    path, info = next(
        (p, i) for p, i in live.ctx.repo.list_targets().items() if p.startswith(f"clf/{version}/")
    )
    now = utcnow()
    desired = DesiredState.build(
        device_id=device_id,
        seq=seq,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        model="clf",
        version=version,
        release=info.custom["release"],
        target=path,
        length=info.length,
        hashes={"sha256": info.hashes["sha256"]},
        probation=QUICK,
    )
    return json.dumps(sign_envelope(desired.to_dict(), key)).encode()


def _bad_signature(live, device_id: str, since: int) -> dict:
    return wait_event(
        live,
        device_id,
        lambda e: (
            e["seq"] > since and e["phase"] == "failed" and (e["reason"] or "").startswith("bad_signature:")
        ),
    )


def _last_event_seq(live, device_id: str) -> int:
    from tests.helpers.device_fleet import events

    return max((e["seq"] for e in events(live, device_id)), default=0)


def test_director_rotation_without_reenrolling_and_retired_key_refused(live_server, tmp_path):
    live = live_server
    enroll_device(live, tmp_path / "dev", "edge-rot")
    enroll_device(live, tmp_path / "late", "edge-late")  # enrolled now, offline until the end
    onnx = tmp_path / "onnx"
    for i, version in enumerate(("1.0.0", "2.0.0", "3.0.0"), start=1):
        push_model(live, "clf", version, make_model(onnx / f"v{i}.onnx", scale=float(i)))
    daemon = Daemon(device_settings(tmp_path / "dev")).start()
    publisher = ServerPublisher(live)
    late = None
    try:
        api = daemon.api.url
        seq1 = assign(live, "edge-rot", "clf", "1.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-rot", seq1)["phase"] == "succeeded"
        old_key = live.ctx.director.key  # the key an attacker steals
        old_id = key_id(old_key.public_key())
        assert daemon.keyring.keyids == [old_id]  # the enrollment pin

        # rotate while the server runs: it signs the next DesiredState with the new key
        done = rotate_director(live.ctx.repo)
        assert live.ctx.director.key_id == done.new_keyid != old_id
        seq2 = assign(live, "edge-rot", "clf", "2.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-rot", seq2)["phase"] == "succeeded"
        assert serving_version(api) == "2.0.0"
        assert daemon.keyring.keyids == [done.new_keyid, old_id]  # synced through TUF, no re-enroll
        stored = json.loads((tmp_path / "dev" / "director-keys.json").read_bytes())
        assert [k["keyid"] for k in stored["keys"]] == [done.new_keyid, old_id]

        # retire the old key; the stolen old key signs a perfectly valid, listed v3 for this device
        retire_director_key(live.ctx.repo, old_id)
        since = _last_event_seq(live, "edge-rot")
        publisher.publish(
            "edge-rot", _signed_by(old_key, live, "edge-rot", daemon.state.last_desired_seq + 5, "3.0.0")
        )
        event = _bad_signature(live, "edge-rot", since)
        # refused at the first gate: signed by a non-current key, so the device re-synced the list
        # before anything else (no TUF check of the target, no download)
        assert event["reason"] == "bad_signature: no signature by a trusted key"
        assert event["desired_seq"] is None  # not authentic
        assert daemon.keyring.keyids == [done.new_keyid]
        assert serving_version(api) == "2.0.0"
        assert infer(api, X)[1]["version"] == "2.0.0"
        assert daemon.state.update is None

        # a device that slept through rotation and retirement trusts only the old key (its pin):
        # the signature checks out locally, but the TUF refresh of the install check brings the
        # current list and the signature is checked again before anything is downloaded
        late = Daemon(device_settings(tmp_path / "late")).start()
        assert late.keyring.keyids == [old_id]
        since = _last_event_seq(live, "edge-late")
        # retained: the daemon may not have subscribed yet (start() returns before it connects)
        publisher.publish("edge-late", _signed_by(old_key, live, "edge-late", 10**6, "3.0.0"), retain=True)
        event = _bad_signature(live, "edge-late", since)
        assert "after refreshing the director keys" in event["reason"]
        assert late.keyring.keyids == [done.new_keyid]
        assert late.state.current == {}
        assert late.state.update is None
        # and the genuine director still reaches it, with the new key, without re-enrolling
        seq3 = assign(live, "edge-late", "clf", "3.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-late", seq3)["phase"] == "succeeded"
        assert infer(late.api.url, X)[1]["version"] == "3.0.0"
    finally:
        publisher.close()
        daemon.stop()
        if late is not None:
            late.stop()


def test_retired_key_cannot_bump_the_seq_of_a_device_that_slept_through_rotation(
    live_server,
    tmp_path,
):
    """The shortcut for a DesiredState of the version a device already serves installs nothing and
    so skips the TUF check; it must still sync the director keys first. Otherwise a stolen retired
    key, the only one a device that was offline through rotation and retirement knows, could raise
    the device's last DesiredState seq, and the genuine director's next states would look stale."""
    live = live_server
    enroll_device(live, tmp_path / "dev", "edge-sleepy")
    push_model(live, "clf", "1.0.0", make_model(tmp_path / "onnx" / "v1.onnx", scale=1.0))
    daemon = Daemon(device_settings(tmp_path / "dev")).start()
    try:
        seq1 = assign(live, "edge-sleepy", "clf", "1.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-sleepy", seq1)["phase"] == "succeeded"
    finally:
        daemon.stop()
    old_key = live.ctx.director.key
    old_id = key_id(old_key.public_key())
    done = rotate_director(live.ctx.repo)  # while the device is offline...
    retire_director_key(live.ctx.repo, old_id)  # ...and the old key is retired

    publisher = ServerPublisher(live)
    daemon = Daemon(device_settings(tmp_path / "dev")).start()
    try:
        assert daemon.keyring.keyids == [old_id]  # it knows only the retired key
        before = daemon.state.last_desired_seq
        since = _last_event_seq(live, "edge-sleepy")
        forged = _signed_by(old_key, live, "edge-sleepy", before + 1000, "1.0.0")  # the version it serves
        publisher.publish("edge-sleepy", forged, retain=True)
        event = _bad_signature(live, "edge-sleepy", since)
        assert "after refreshing the director keys" in event["reason"]
        assert daemon.keyring.keyids == [done.new_keyid]
        assert daemon.state.last_desired_seq == before  # not raised by the stolen key
        # the genuine director's next DesiredState (new key, next seq) is still accepted
        seq2 = assign(live, "edge-sleepy", "clf", "1.0.0", probation=QUICK)["seq"]
        assert seq2 < before + 1000
        out = outcome_for(live, "edge-sleepy", seq2)
        assert (out["phase"], out["reason"]) == ("succeeded", "already serving this version")
    finally:
        publisher.close()
        daemon.stop()
