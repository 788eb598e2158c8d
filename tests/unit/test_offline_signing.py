"""Targets metadata staged on the server and signed with an offline targets key (``fleet model sign``),
on real files, verified by a real ``tuf.ngclient.Updater``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api.metadata import Targets

from server.trust.keys import load_private_key
from server.trust.repository import (
    ROLE_KEY_FILES,
    ImageRepository,
    SignatureRejected,
    StagingError,
    consistent_target_name,
    sign_staged_targets,
)
from tests.helpers.tuf_repo import CUSTOM, Clock, bundle, make_repo, updater_for

PATH = "resnet/1.2.0/default/bundle.tar"


@pytest.fixture
def offline(tmp_path: Path) -> tuple[ImageRepository, Ed25519PrivateKey, Clock]:
    """A repository whose targets key has been moved off the host (returned, as the vault's copy)."""
    clock = Clock()
    clock.now = datetime.now(UTC).replace(microsecond=0)  # ngclient checks expiry against real time
    repo = make_repo(tmp_path, clock)
    key_file = repo.key_dir / ROLE_KEY_FILES[Targets.type]
    key = load_private_key(key_file)
    key_file.unlink()
    return repo, key, clock


def _staged_dict(repo: ImageRepository) -> dict:
    staged = repo.staged_targets()
    assert staged is not None
    return staged.to_dict()


def test_stage_then_sign_offline_publishes_for_ngclient(offline, tmp_path: Path) -> None:
    repo, key, clock = offline
    content = b"bundle" * 1000
    info, previous = repo.stage_target(PATH, bundle(tmp_path, "a.tar", content), CUSTOM)
    assert previous is None
    # staged, not published: the signed metadata does not list it, but the file is stored
    assert repo.list_targets() == {}
    assert repo.versions()["targets"] == 1
    stored = repo.targets_dir / consistent_target_name(PATH, info.hashes["sha256"])
    assert stored.read_bytes() == content
    staged = repo.staged_targets()
    assert staged is not None
    assert staged.signed.version == 2
    assert not staged.signatures
    listed, unlisted = repo.staged_changes(staged)
    assert list(listed) == [PATH]
    assert unlisted == {}

    signed = sign_staged_targets(_staged_dict(repo), key, clock.now + timedelta(days=30))
    listed, unlisted = repo.publish_signed_targets(signed)
    assert list(listed) == [PATH]
    assert unlisted == {}
    assert repo.staged_targets() is None
    assert repo.versions() == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    assert repo.expires()["targets"] == clock.now + timedelta(days=30)

    up = updater_for(repo, tmp_path)
    up.refresh()
    ti = up.get_targetinfo(PATH)
    assert ti is not None
    assert ti.custom == CUSTOM
    assert Path(up.download_target(ti)).read_bytes() == content


def test_signature_by_another_key_is_rejected_and_nothing_published(offline, tmp_path: Path) -> None:
    repo, _key, clock = offline
    repo.stage_target(PATH, bundle(tmp_path, "a.tar", b"a"), CUSTOM)
    stranger = Ed25519PrivateKey.generate()
    forged = sign_staged_targets(_staged_dict(repo), stranger, clock.now + timedelta(days=1))
    with pytest.raises(SignatureRejected, match="not signed by the root's targets key"):
        repo.publish_signed_targets(forged)
    assert repo.list_targets() == {}
    assert repo.staged_targets() is not None  # still waiting for a good signature


def test_signed_content_must_be_what_is_staged(offline, tmp_path: Path) -> None:
    repo, key, clock = offline
    repo.stage_target(PATH, bundle(tmp_path, "a.tar", b"a"), CUSTOM)
    tampered = _staged_dict(repo)
    tampered["signed"]["targets"][PATH]["custom"]["release"] = 99
    with pytest.raises(StagingError, match="not what is staged"):
        repo.publish_signed_targets(sign_staged_targets(tampered, key, clock.now + timedelta(days=1)))
    # the stage moved on (another push) after the signer fetched it: refused the same way
    fetched = _staged_dict(repo)
    repo.stage_target("other/1.0.0/default/bundle.tar", bundle(tmp_path, "b.tar", b"b"), CUSTOM)
    with pytest.raises(StagingError, match="not what is staged"):
        repo.publish_signed_targets(sign_staged_targets(fetched, key, clock.now + timedelta(days=1)))
    assert repo.list_targets() == {}


@pytest.mark.parametrize("days", [-1, 0, 91])
def test_expiry_must_lie_within_the_targets_lifetime(offline, tmp_path: Path, days: int) -> None:
    repo, key, clock = offline
    repo.stage_target(PATH, bundle(tmp_path, "a.tar", b"a"), CUSTOM)
    signed = sign_staged_targets(_staged_dict(repo), key, clock.now + timedelta(days=days))
    with pytest.raises(SignatureRejected, match="expires"):
        repo.publish_signed_targets(signed)


def test_garbage_and_nothing_staged(offline) -> None:
    repo, key, clock = offline
    with pytest.raises(SignatureRejected, match="not a signed targets metadata"):
        repo.publish_signed_targets(b"{not json")
    snapshot = json.loads((repo.metadata_dir / "1.snapshot.json").read_bytes())
    with pytest.raises(SignatureRejected, match="expected targets"):
        repo.publish_signed_targets(json.dumps(snapshot).encode())
    current = json.loads((repo.metadata_dir / "1.targets.json").read_bytes())
    with pytest.raises(StagingError, match="nothing is staged"):
        repo.publish_signed_targets(sign_staged_targets(current, key, clock.now + timedelta(days=1)))


def test_staged_removal_keeps_target_listed_until_signed(offline, tmp_path: Path) -> None:
    repo, key, clock = offline
    repo.stage_target(PATH, bundle(tmp_path, "a.tar", b"a"), CUSTOM)
    info, _ = repo.stage_target("m/2.0.0/default/bundle.tar", bundle(tmp_path, "b.tar", b"b"), CUSTOM)
    repo.publish_signed_targets(sign_staged_targets(_staged_dict(repo), key, clock.now + timedelta(days=1)))
    assert repo.stage_removal("m/2.0.0/default/bundle.tar") == info
    assert repo.stage_removal("no/such/target.tar") is None
    assert "m/2.0.0/default/bundle.tar" in repo.list_targets()  # still signed as listed
    # its file stays while it is listed anywhere
    assert not repo.purge_target_file(info)
    _, unlisted = repo.publish_signed_targets(
        sign_staged_targets(_staged_dict(repo), key, clock.now + timedelta(days=1))
    )
    assert list(unlisted) == ["m/2.0.0/default/bundle.tar"]
    assert list(repo.list_targets()) == [PATH]
    assert repo.purge_target_file(info)


def test_unstage_restores_or_drops_the_stage(offline, tmp_path: Path) -> None:
    repo, _key, _clock = offline
    _, previous = repo.stage_target(PATH, bundle(tmp_path, "a.tar", b"a"), CUSTOM)
    repo.unstage(PATH, previous)
    assert repo.staged_targets() is None  # nothing left to sign
    first, _ = repo.stage_target(PATH, bundle(tmp_path, "a.tar", b"a"), CUSTOM)
    _, previous = repo.stage_target("m/2.0.0/default/bundle.tar", bundle(tmp_path, "b.tar", b"b"), CUSTOM)
    repo.unstage("m/2.0.0/default/bundle.tar", previous)
    staged = repo.staged_targets()
    assert staged is not None
    assert dict(staged.signed.targets) == {PATH: first}


def test_key_back_online_folds_the_stage_into_the_next_publish(offline, tmp_path: Path) -> None:
    repo, key, _clock = offline
    repo.stage_target(PATH, bundle(tmp_path, "a.tar", b"a"), CUSTOM)
    with repo.using_keys({Targets.type: key}):  # a publish window
        repo.add_target("m/2.0.0/default/bundle.tar", bundle(tmp_path, "b.tar", b"b"), CUSTOM)
    assert sorted(repo.list_targets()) == ["m/2.0.0/default/bundle.tar", PATH]
    assert repo.staged_targets() is None


def test_staged_changes_survive_a_targets_key_rotation(offline, tmp_path: Path) -> None:
    """A rotation re-publishes the current targets only: the stage stays, re-numbered to the next
    version, and from then on only the new targets key can sign it."""
    repo, old_key, clock = offline
    repo.stage_target(PATH, bundle(tmp_path, "a.tar", b"a"), CUSTOM)
    new_key = Ed25519PrivateKey.generate()
    repo.rotate_role(Targets.type, new_key)
    assert repo.versions()["targets"] == 2
    assert repo.list_targets() == {}
    staged = repo.staged_targets()
    assert staged is not None
    assert staged.signed.version == 3
    assert list(staged.signed.targets) == [PATH]
    expires = clock.now + timedelta(days=1)
    with pytest.raises(SignatureRejected):
        repo.publish_signed_targets(sign_staged_targets(staged.to_dict(), old_key, expires))
    repo.publish_signed_targets(sign_staged_targets(staged.to_dict(), new_key, expires))
    assert list(repo.list_targets()) == [PATH]
    assert repo.versions()["targets"] == 3


def test_refresh_stages_a_renewal_when_the_targets_key_is_offline(offline) -> None:
    repo, key, clock = offline
    later = clock.now + timedelta(days=60)  # less than half of the 90-day lifetime left
    assert repo.refresh_expiring(now=later) == ["snapshot", "timestamp"]
    staged = repo.staged_targets()
    assert staged is not None
    assert repo.staged_changes(staged) == ({}, {})
    clock.now = later
    repo.publish_signed_targets(sign_staged_targets(staged.to_dict(), key, later + timedelta(days=90)))
    assert repo.expires()["targets"] == later + timedelta(days=90)
    assert repo.refresh_expiring(now=later) == []
