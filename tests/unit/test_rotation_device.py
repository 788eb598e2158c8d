"""The device side of key rotation: TufVerifier (real ngclient over real HTTP) syncs the director
key list published in the image repository; a TUF-verified list replaces the enrollment pin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api.metadata import Root, Snapshot, Targets, Timestamp

from device_client.fetcher import HttpSettings
from device_client.protocol import InvalidPayload
from device_client.protocol.director_keys import DIRECTOR_KEYS_TARGET, DirectorKeyList
from device_client.protocol.signing import key_id, public_key_to_pem
from device_client.trust import DirectorKeyring, RepositoryError, TufVerifier
from server.trust.director import Director
from server.trust.repository import ImageRepository, consistent_target_name
from server.trust.rotation import retire_director_key, rotate_director, rotate_tuf_role
from tests.helpers.tuf_repo import serve_dir

CUSTOM = {"model": "clf", "version": "1.0.0", "release": 1, "variant": "default", "constraints": {}}
TARGET = "clf/1.0.0/default/bundle.tar"


@pytest.fixture
def world(tmp_path: Path):
    """(repo, director, keyring, verifier): a device enrolled with the director key as pin."""
    repo = ImageRepository(tmp_path / "repo", tmp_path / "keys")
    repo.initialize()
    director = Director(tmp_path / "keys")
    src = tmp_path / "bundle.tar"
    src.write_bytes(b"x" * 100)
    repo.add_target(TARGET, src, CUSTOM)
    dev = tmp_path / "device"
    (dev / "tuf").mkdir(parents=True)
    (dev / "tuf" / "root.json").write_text(json.dumps(repo.trusted_root()))
    (dev / "director.pem").write_text(director.public_key_pem)
    keyring = DirectorKeyring(dev / "director.pem", dev / "director-keys.json")
    with serve_dir(tmp_path / "repo") as url:
        verifier = TufVerifier(
            dev / "tuf", f"{url}/metadata/", f"{url}/targets/", HttpSettings(), deadline_s=10, keyring=keyring
        )
        yield repo, director, keyring, verifier


def test_rotation_and_retirement_reach_the_device_through_tuf(world) -> None:
    repo, director, keyring, verifier = world
    k1 = director.key_id
    assert verifier.sync_director_keys() is False  # nothing published: the enrollment pin holds
    assert keyring.keyids == [k1]
    assert keyring.version == 0

    done = rotate_director(repo)
    assert verifier.sync_director_keys() is True
    assert keyring.keyids == [done.new_keyid, k1]
    assert keyring.primary == done.new_keyid == director.key_id
    # persisted: a restarted device trusts the synced list, not the pin
    again = DirectorKeyring(keyring.enrolled_pem, keyring.store)
    assert again.keyids == [done.new_keyid, k1]
    assert verifier.sync_director_keys() is False  # unchanged: no download

    retire_director_key(repo, k1)
    assert verifier.lookup(TARGET) is not None  # every install check syncs the list too
    assert keyring.keyids == [done.new_keyid]
    assert keyring.version == 2


def test_a_tampered_key_list_on_the_mirror_is_refused(world) -> None:
    repo, _director, keyring, verifier = world
    rotate_director(repo)
    info = repo.get_target(DIRECTOR_KEYS_TARGET)
    stored = repo.targets_dir / consistent_target_name(DIRECTOR_KEYS_TARGET, info.hashes["sha256"])
    # the attacker (mirror/CDN) swaps in a list of its own key, with a higher version, same length
    rogue = DirectorKeyList(version=99, keys=(Ed25519PrivateKey.generate().public_key(),)).to_bytes()
    real = stored.read_bytes()
    assert len(rogue) < len(real)  # padded with JSON whitespace: still a valid, parseable list
    stored.write_bytes(rogue[: len(real)].ljust(len(real), b" "))
    with pytest.raises(RepositoryError):
        verifier.sync_director_keys()
    assert keyring.version == 0  # still the enrollment pin
    assert not keyring.store.exists()


def test_a_list_older_than_the_trusted_one_is_refused(tmp_path: Path) -> None:
    k1, k2 = (Ed25519PrivateKey.generate().public_key() for _ in range(2))
    (tmp_path / "director.pem").write_text(public_key_to_pem(k1))
    ring = DirectorKeyring(tmp_path / "director.pem", tmp_path / "director-keys.json")
    assert ring.apply(DirectorKeyList(version=2, keys=(k2, k1)).to_bytes()) is True
    with pytest.raises(InvalidPayload, match="older"):
        ring.apply(DirectorKeyList(version=1, keys=(k1,)).to_bytes())
    assert ring.keyids == [key_id(k2), key_id(k1)]


def test_device_walks_rotated_roots_and_role_keys_to_reach_the_key_list(world) -> None:
    repo, _director, keyring, verifier = world
    assert verifier.lookup(TARGET) is not None  # the device trusts root v1 and the v1 roles
    for role in (Root.type, Timestamp.type, Snapshot.type, Targets.type, Root.type):
        rotate_tuf_role(repo, role)
    done = rotate_director(repo)
    assert verifier.sync_director_keys() is True
    assert keyring.primary == done.new_keyid
    trusted = json.loads((verifier.metadata_dir / "root.json").read_bytes())
    assert trusted["signed"]["version"] == repo.versions()["root"] == 6
