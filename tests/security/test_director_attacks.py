"""Attacks on the director channel (DesiredState), against a real daemon serving clf 2.0.0.

Every forged or stale message below names a version that IS published and valid (3.0.0, or 1.0.0
for the downgrade), so the one check under test is the only thing between the attacker and an
install: remove it and the device would install that version, failing the ``device`` fixture's
"still serves 2.0.0" check as well as the exact rejection asserted here.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_client.protocol import DesiredState
from device_client.protocol.messages import utcnow
from tests.helpers.testbed import DEVICE_ID

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module", autouse=True)
def published(tb):
    tb.publish("3.0.0", 3, scale=3.0)
    tb.publish("1.0.0", 1, scale=1.0)


def _refused(device, payload, code: str) -> dict:
    """Send ``payload``; return the device's ``failed`` report, which must carry ``code``."""
    last = device.daemon.state.last_desired_seq
    report = device.rejection(device.send(payload))
    assert report["details"]["code"] == code, report
    assert report["reason"].startswith(f"{code}: "), report
    if report["desired_seq"] is None:  # an unauthentic message changes nothing, not even the seq
        assert device.daemon.state.last_desired_seq == last
    return report


def test_forged_signature(device):
    # protection: verify_envelope accepts only signatures by the enrolled director key
    rogue = Ed25519PrivateKey.generate()
    desired = device.desired("3.0.0")
    report = _refused(device, device.sign(desired, rogue), "bad_signature")
    assert report["reason"] == "bad_signature: no signature by a trusted key"
    assert report["desired_seq"] is None
    assert report["details"]["claimed_seq"] == desired["seq"]


def test_genuine_signature_over_a_tampered_body(device):
    # protection: the signature covers the canonical JSON of the whole signed body
    envelope = device.sign(device.desired("2.0.0"))
    envelope["signed"].update(version="3.0.0", release=3, target="clf/3.0.0/default/bundle.tar")
    info = device.repo.get_target("clf/3.0.0/default/bundle.tar")
    envelope["signed"].update(length=info.length, hashes=dict(info.hashes))
    report = _refused(device, envelope, "bad_signature")
    assert report["reason"] == "bad_signature: signature does not verify"


def test_unsigned(device):
    # protection: an envelope without signatures is refused before anything else
    report = _refused(device, {"signed": device.desired("3.0.0"), "signatures": []}, "unsigned")
    assert report["reason"] == "unsigned: the envelope carries no signature"


def test_addressed_to_another_device(device):
    # protection: device_id binding (a genuine state for edge-other cannot be replayed to us)
    envelope = device.sign(device.desired("3.0.0", device_id="edge-other"))
    report = _refused(device, envelope, "wrong_device")
    assert report["reason"] == f"wrong_device: addressed to 'edge-other', this is '{DEVICE_ID}'"


def test_replayed_older_seq(device):
    # protection: seq must be strictly greater than the last accepted one. The director signs A
    # (3.0.0) which the attacker withholds, then B (the current version); replaying A afterwards
    # must not install 3.0.0.
    a = device.sign(device.desired("3.0.0"))
    b = device.desired("2.0.0", seq=a["signed"]["seq"] + 1)
    mark = device.send(device.sign(b))
    assert device.outcome(b["seq"], mark)["reason"] == "already serving this version"
    report = _refused(device, a, "replayed")
    assert report["reason"] == f"replayed: seq {a['signed']['seq']} is older than the accepted {b['seq']}"


def test_redelivered_accepted_seq_is_not_acted_on_twice(device):
    # protection: the accepted seq itself is a duplicate (a retained redelivery): ignored silently
    d = device.desired("2.0.0")
    mark = device.send(device.sign(d))
    device.outcome(d["seq"], mark)
    mark = device.send(device.sign(d))
    device.send(device.sign(device.desired("2.0.0")))  # a fence: its report proves the first was seen
    device.wait_report(lambda r: r["desired_seq"] == d["seq"] + 1, mark)
    assert not [r for r in device.reports[mark:] if r["desired_seq"] == d["seq"]]


def test_past_expiry(device):
    # protection: expires_at must be in the future (an old, never delivered state is dead)
    now = utcnow()
    d = device.desired("3.0.0", issued_at=now - timedelta(hours=2), expires_at=now - timedelta(hours=1))
    report = _refused(device, device.sign(d), "expired")
    expires = DesiredState.model_validate(d).expires_at.isoformat()
    assert report["reason"] == f"expired: expired at {expires}"


def test_downgrade_below_the_release_floor_with_a_valid_director_key(device):
    # protection: check_release_floor. 1.0.0 is listed and signed by the real director key, so the
    # signature and TUF checks pass; only the floor (release 2, raised by the baseline install)
    # stops it. The report carries desired_seq: the message was authentic, the deployment fails.
    d = device.desired("1.0.0")
    report = _refused(device, device.sign(d), "release_floor")
    assert report["reason"] == (
        "release_floor: release 1 of clf is below the floor 2 and is not the version this device ran before"
    )
    assert report["desired_seq"] == d["seq"]
    assert device.daemon.state.release_floor["clf"] == 2


def test_revoked_version(device):
    # protection: revocation removes the target from the TUF targets metadata, and the device
    # installs only listed targets, even on the real director's word (a stolen director key)
    device.publish("3.1.0", 4, scale=3.5)
    d = device.desired("3.1.0")  # the genuine length and hashes, taken while it was listed
    device.repo.remove_target("clf/3.1.0/default/bundle.tar")
    report = _refused(device, device.sign(d), "target_not_listed")
    assert report["reason"] == (
        "target_not_listed: 'clf/3.1.0/default/bundle.tar' is not listed by the image repository"
        " (unpublished or revoked)"
    )
    assert report["desired_seq"] == d["seq"]


def test_target_not_listed_with_a_stolen_director_key(device, tmp_path):
    # protection: the image repository must list the exact target; the attacker even serves the
    # bundle on the mirror under its consistent-snapshot name
    from tests.helpers.bundles import make_bundle

    tar, _ = make_bundle(tmp_path, name="clf", version="6.6.6", release=66)
    from device_client.protocol.bundle import file_sha256

    length, sha = file_sha256(tar)
    device.mirror.lie(f"targets/clf/6.6.6/default/{sha}.bundle.tar", body=tar.read_bytes())
    d = device.desired(
        "6.6.6", release=66, target="clf/6.6.6/default/bundle.tar", length=length, hashes={"sha256": sha}
    )
    report = _refused(device, device.sign(d), "target_not_listed")
    assert "'clf/6.6.6/default/bundle.tar' is not listed" in report["reason"]
    assert not [p for p in device.mirror.requests if "6.6.6" in p]  # never even downloaded


def test_listed_target_with_other_hashes(device):
    # protection: the director's length/hashes must equal the repository's for that target
    d = device.desired("3.0.0", hashes={"sha256": "ab" * 32}, length=12345)
    report = _refused(device, device.sign(d), "target_mismatch")
    assert report["reason"] == (
        "target_mismatch: 'clf/3.0.0/default/bundle.tar': the image repository disagrees: "
        f"length {device.repo.get_target('clf/3.0.0/default/bundle.tar').length} != 12345; sha256 differs"
    )
