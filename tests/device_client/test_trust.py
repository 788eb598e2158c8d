"""Trust decisions: every rejection of ``verify_desired``, the release floor, and ``TufVerifier``
against a real python-tuf image repository served over HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_client.fetcher import HttpSettings
from device_client.protocol import DesiredState
from device_client.protocol.signing import sign_envelope
from device_client.state import Slot
from device_client.trust import (
    BadSignature,
    Duplicate,
    Expired,
    Malformed,
    ReleaseFloor,
    Replayed,
    RepositoryError,
    RepositoryUnavailable,
    TargetMismatch,
    TargetNotListed,
    TufVerifier,
    Unsigned,
    WrongDevice,
    check_release_floor,
    target_url,
    verify_desired,
)
from server.trust.repository import ImageRepository
from tests.helpers.tuf_repo import serve_dir

NOW = datetime(2030, 1, 1, tzinfo=UTC)
KEY = Ed25519PrivateKey.generate()
KEYS = [KEY.public_key()]
SHA = "ab" * 32


def desired_dict(**overrides) -> dict:
    fields = {
        "device_id": "dev-1",
        "seq": 5,
        "issued_at": NOW - timedelta(minutes=1),
        "expires_at": NOW + timedelta(days=1),
        "model": "clf",
        "version": "2.0.0",
        "release": 2,
        "target": "clf/2.0.0/default/bundle.tar",
        "length": 100,
        "hashes": {"sha256": SHA},
    }
    fields.update(overrides)
    return DesiredState.build(**fields).to_dict()


def envelope(key=KEY, **overrides) -> bytes:
    return json.dumps(sign_envelope(desired_dict(**overrides), key)).encode()


def verify(data: bytes, last_seq: int = 4) -> DesiredState:
    return verify_desired(data, KEYS, "dev-1", last_seq, NOW)


def test_valid_desired_state_is_returned():
    d = verify(envelope())
    assert (d.device_id, d.seq, d.model, d.version) == ("dev-1", 5, "clf", "2.0.0")


@pytest.mark.parametrize(
    ("data", "exc", "needle"),
    [
        (b"not json", Malformed, "not JSON"),
        (b"[1, 2]", Malformed, "not a JSON object"),
        (b'{"signed": {}}', Malformed, "'signatures' list"),
        (b"x" * 70_000, Malformed, "exceeds"),
        (json.dumps({"signed": desired_dict(), "signatures": []}).encode(), Unsigned, "no signature"),
        (envelope(key=Ed25519PrivateKey.generate()), BadSignature, "no signature by a trusted key"),
    ],
)
def test_malformed_and_unsigned_and_forged(data, exc, needle):
    with pytest.raises(exc) as info:
        verify(data)
    assert needle in info.value.message
    assert not info.value.authentic


def test_lone_surrogate_in_the_payload_is_malformed():
    # valid JSON (an escaped lone surrogate) whose canonical form cannot be encoded as UTF-8
    data = b'{"signed": {"seq": 6, "model": "\\ud800"}, "signatures": [{"keyid": "ab", "sig": "AA=="}]}'
    with pytest.raises(Malformed) as info:
        verify(data)
    assert "UTF-8" in info.value.message
    assert info.value.seq == 6
    assert not info.value.authentic


def test_tampered_signed_body_fails_the_signature():
    env = sign_envelope(desired_dict(), KEY)
    env["signed"]["version"] = "9.9.9"
    with pytest.raises(BadSignature) as info:
        verify(json.dumps(env).encode())
    assert info.value.code == "bad_signature"
    assert info.value.seq == 5  # the claimed seq is kept for the report's details


def test_signed_but_not_a_desired_state_is_malformed():
    data = json.dumps(sign_envelope({"schema": "fleet.desired/1", "seq": 7}, KEY)).encode()
    with pytest.raises(Malformed):
        verify(data)
    bad_hash = json.dumps(sign_envelope(desired_dict(hashes={"sha512": "00"}), KEY)).encode()
    with pytest.raises(Malformed, match="sha256"):
        verify(bad_hash)


def test_wrong_device_duplicate_replayed_expired():
    with pytest.raises(WrongDevice):
        verify(envelope(device_id="dev-2"))
    with pytest.raises(Duplicate):
        verify(envelope(), last_seq=5)
    with pytest.raises(Replayed) as info:
        verify(envelope(seq=3), last_seq=5)
    assert info.value.reason == "replayed: seq 3 is older than the accepted 5"
    with pytest.raises(Expired):
        verify(envelope(expires_at=NOW, issued_at=NOW - timedelta(days=1)))
    with pytest.raises(Malformed, match="expires_at"):
        verify_desired(
            envelope(issued_at=NOW + timedelta(days=2), expires_at=NOW + timedelta(days=1)),
            KEYS,
            "dev-1",
            0,
            NOW,
        )


def test_release_floor_allows_only_the_previous_version_below_it():
    d = DesiredState.model_validate(desired_dict(release=2, version="2.0.0"))
    check_release_floor(d, 2, None)
    check_release_floor(d, 1, None)
    prev = Slot(model="clf", version="2.0.0", release=2, path="models/clf/2.0.0-default")
    check_release_floor(d, 3, prev)  # rollback to what this device ran before
    other = Slot(model="clf", version="1.0.0", release=1, path="models/clf/1.0.0-default")
    with pytest.raises(ReleaseFloor) as info:
        check_release_floor(d, 3, other)
    assert info.value.authentic
    assert info.value.seq == 5


def test_target_url_uses_the_consistent_snapshot_name():
    assert target_url("http://s/tuf/targets/", "a/b/c.tar", SHA) == f"http://s/tuf/targets/a/b/{SHA}.c.tar"
    assert target_url("http://s/t", "c.tar", SHA) == f"http://s/t/{SHA}.c.tar"


# --------------------------------------------------------------------------- TufVerifier


@pytest.fixture
def tuf_repo(tmp_path: Path):
    repo = ImageRepository(tmp_path / "repo", tmp_path / "keys")
    repo.initialize()
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(b"x" * 100)
    custom = {"model": "clf", "version": "2.0.0", "release": 2, "variant": "default", "constraints": {}}
    info = repo.add_target("clf/2.0.0/default/bundle.tar", bundle, custom)
    device_meta = tmp_path / "device-tuf"
    device_meta.mkdir()
    (device_meta / "root.json").write_text(json.dumps(repo.trusted_root()))
    with serve_dir(tmp_path / "repo") as url:
        verifier = TufVerifier(
            device_meta, f"{url}/metadata/", f"{url}/targets/", HttpSettings(), deadline_s=10
        )
        yield repo, verifier, info


def listed(info, **overrides) -> DesiredState:
    fields = {"length": info.length, "hashes": {"sha256": info.hashes["sha256"]}}
    fields.update(overrides)
    return DesiredState.model_validate(desired_dict(**fields))


def test_tuf_accepts_the_listed_target(tuf_repo):
    _, verifier, info = tuf_repo
    got = verifier.check(listed(info))
    assert got.hashes == info.hashes
    assert verifier.url(listed(info)).endswith(
        f"/targets/clf/2.0.0/default/{info.hashes['sha256']}.bundle.tar"
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"length": 101}, "length 100 != 101"),
        ({"hashes": {"sha256": SHA}}, "sha256 differs"),
        ({"release": 7}, "custom release 2 != 7"),
        ({"version": "2.0.1", "target": "clf/2.0.0/default/bundle.tar"}, "custom version"),
        ({"variant": "gpu"}, "custom variant"),
    ],
)
def test_tuf_refuses_a_mismatching_target(tuf_repo, overrides, needle):
    _, verifier, info = tuf_repo
    with pytest.raises(TargetMismatch) as exc:
        verifier.check(listed(info, **overrides))
    assert needle in exc.value.message
    assert exc.value.authentic


def test_tuf_refuses_unlisted_and_revoked_targets(tuf_repo):
    repo, verifier, info = tuf_repo
    with pytest.raises(TargetNotListed):
        verifier.check(listed(info, target="clf/2.0.0/default/other.tar"))
    repo.remove_target("clf/2.0.0/default/bundle.tar")
    with pytest.raises(TargetNotListed, match="unpublished or revoked"):
        verifier.check(listed(info))


def test_listed_targets_follow_publishing_and_revocation(tuf_repo, tmp_path):
    repo, verifier, info = tuf_repo
    assert {p: t.hashes for p, t in verifier.listed_targets().items()} == {
        "clf/2.0.0/default/bundle.tar": info.hashes
    }
    bundle = tmp_path / "bundle-3.tar"
    bundle.write_bytes(b"y" * 50)
    custom = {"model": "clf", "version": "3.0.0", "release": 3, "variant": "default", "constraints": {}}
    repo.add_target("clf/3.0.0/default/bundle.tar", bundle, custom)
    repo.remove_target("clf/2.0.0/default/bundle.tar")
    listed_now = verifier.listed_targets()
    assert list(listed_now) == ["clf/3.0.0/default/bundle.tar"]
    new = listed_now["clf/3.0.0/default/bundle.tar"]
    assert (new.length, new.custom) == (50, custom)


def test_tuf_refuses_metadata_signed_by_someone_else(tuf_repo, tmp_path):
    _repo, verifier, info = tuf_repo
    verifier.check(listed(info))
    # an attacker replaces the repository with one signed by other keys
    evil = ImageRepository(tmp_path / "evil", tmp_path / "evil-keys")
    evil.initialize()
    bundle = tmp_path / "bundle.tar"
    evil.add_target("clf/2.0.0/default/bundle.tar", bundle, {"model": "clf"})
    for f in (tmp_path / "repo" / "metadata").iterdir():
        f.unlink()
    for f in (tmp_path / "evil" / "metadata").iterdir():
        (tmp_path / "repo" / "metadata" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RepositoryError) as exc:
        verifier.check(listed(info))
    assert not isinstance(exc.value, RepositoryUnavailable)


def test_unreachable_repository_is_worth_a_retry(tmp_path):
    from server.mqtt.broker import free_port

    meta = tmp_path / "m"
    meta.mkdir()
    repo = ImageRepository(tmp_path / "repo", tmp_path / "keys")
    repo.initialize()
    (meta / "root.json").write_text(json.dumps(repo.trusted_root()))
    url = f"http://127.0.0.1:{free_port()}"
    verifier = TufVerifier(meta, f"{url}/metadata/", f"{url}/targets/", HttpSettings(), deadline_s=5)
    with pytest.raises(RepositoryUnavailable):
        verifier.check(DesiredState.model_validate(desired_dict()))
