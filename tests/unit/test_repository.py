"""ImageRepository on real files, verified by a real ``tuf.ngclient.Updater`` reading them."""

from __future__ import annotations

import json
import multiprocessing
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import Updater

from server.trust.repository import (
    ROLE_KEY_FILES,
    ImageRepository,
    InvalidTargetPath,
    RepositoryError,
    SigningKeyUnavailable,
    TargetExists,
    as_signer,
    consistent_target_name,
)
from tests.helpers.tuf_repo import BASE, CUSTOM, Clock, DirFetcher, bundle, make_repo, updater_for


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repo(tmp_path: Path, clock: Clock) -> ImageRepository:
    return make_repo(tmp_path, clock)


def test_initialize_creates_keys_0600_and_v1_metadata(repo: ImageRepository) -> None:
    for name in ROLE_KEY_FILES.values():
        mode = stat.S_IMODE((repo.key_dir / name).stat().st_mode)
        assert mode == 0o600, name
    names = sorted(p.name for p in repo.metadata_dir.iterdir() if not p.name.startswith("."))
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "root.json", "timestamp.json"]
    assert repo.versions() == {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 1}
    root = repo.trusted_root()
    assert root["signed"]["consistent_snapshot"] is True
    assert set(root["signed"]["roles"]) == {"root", "targets", "snapshot", "timestamp"}
    assert len(root["signed"]["keys"]) == 4


def test_initialize_is_idempotent(tmp_path: Path, clock: Clock) -> None:
    repo = make_repo(tmp_path, clock)
    before = {p.name: p.read_bytes() for p in repo.metadata_dir.iterdir()}
    keys = {p.name: p.read_bytes() for p in repo.key_dir.iterdir()}
    again = make_repo(tmp_path, clock)
    assert {p.name: p.read_bytes() for p in again.metadata_dir.iterdir()} == before
    assert {p.name: p.read_bytes() for p in again.key_dir.iterdir()} == keys


def test_initialize_refuses_keys_of_another_repository(tmp_path: Path, clock: Clock) -> None:
    make_repo(tmp_path, clock)
    (tmp_path / "keys" / ROLE_KEY_FILES["timestamp"]).unlink()
    other = ImageRepository(tmp_path / "other", tmp_path / "keys", clock=clock)
    other.initialize()  # regenerates the timestamp key, for the other repository's root
    with pytest.raises(SigningKeyUnavailable):
        ImageRepository(tmp_path / "repo", tmp_path / "keys", clock=clock).initialize()


def test_expiries_follow_constructor(repo: ImageRepository, clock: Clock) -> None:
    exp = repo.expires()
    assert exp["root"] == clock.now + timedelta(days=365)
    assert exp["targets"] == clock.now + timedelta(days=90)
    assert exp["snapshot"] == clock.now + timedelta(days=7)
    assert exp["timestamp"] == clock.now + timedelta(days=1)


def test_publish_then_ngclient_downloads(repo: ImageRepository, tmp_path: Path, clock: Clock) -> None:
    clock.now = datetime.now(UTC).replace(microsecond=0)  # ngclient checks expiry against real time
    content = b"bundle-one" * 1000
    info = repo.add_target("resnet/1.2.0/default/bundle.tar", bundle(tmp_path, "a.tar", content), CUSTOM)
    assert info.length == len(content)
    stored = repo.targets_dir / consistent_target_name(
        "resnet/1.2.0/default/bundle.tar", info.hashes["sha256"]
    )
    assert stored.read_bytes() == content
    assert repo.target_file("resnet/1.2.0/default/bundle.tar") == stored
    assert repo.versions() == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    assert repo.get_target("resnet/1.2.0/default/bundle.tar").custom == CUSTOM

    up = updater_for(repo, tmp_path)
    up.refresh()
    ti = up.get_targetinfo("resnet/1.2.0/default/bundle.tar")
    assert ti is not None
    assert ti.custom == CUSTOM
    path = up.download_target(ti)
    assert Path(path).read_bytes() == content


def test_versions_increase_and_old_metadata_is_kept(repo: ImageRepository, tmp_path: Path) -> None:
    for i in range(3):
        repo.add_target(f"m/1.0.{i}/default/bundle.tar", bundle(tmp_path, f"{i}.tar", b"x%d" % i), CUSTOM)
    assert repo.versions() == {"root": 1, "targets": 4, "snapshot": 4, "timestamp": 4}
    for n in range(1, 5):
        assert (repo.metadata_dir / f"{n}.targets.json").exists()
        assert (repo.metadata_dir / f"{n}.snapshot.json").exists()
    assert sorted(repo.list_targets()) == [f"m/1.0.{i}/default/bundle.tar" for i in range(3)]


def test_readding_same_target_is_noop_other_content_conflicts(repo: ImageRepository, tmp_path: Path) -> None:
    path = "m/1.0.0/default/bundle.tar"
    repo.add_target(path, bundle(tmp_path, "a", b"aaa"), CUSTOM)
    repo.add_target(path, bundle(tmp_path, "a", b"aaa"), CUSTOM)
    assert repo.versions()["targets"] == 2
    with pytest.raises(TargetExists):
        repo.add_target(path, bundle(tmp_path, "b", b"bbb"), CUSTOM)
    old_file = repo.target_file(path)
    repo.add_target(path, bundle(tmp_path, "b", b"bbb"), CUSTOM, replace=True)
    assert not old_file.exists()
    assert repo.target_file(path).read_bytes() == b"bbb"


def test_remove_target_revokes_and_deletes_file(repo: ImageRepository, tmp_path: Path, clock: Clock) -> None:
    clock.now = datetime.now(UTC).replace(microsecond=0)
    path = "m/1.0.0/default/bundle.tar"
    repo.add_target(path, bundle(tmp_path, "a", b"aaa"), CUSTOM)
    repo.add_target("m/1.0.1/default/bundle.tar", bundle(tmp_path, "b", b"bbb"), CUSTOM)
    stored = repo.target_file(path)
    up = updater_for(repo, tmp_path, "early")
    up.refresh()
    assert up.get_targetinfo(path) is not None

    assert repo.remove_target(path) is not None
    assert repo.get_target(path) is None
    assert not stored.exists()
    assert repo.remove_target(path) is None
    assert repo.versions()["targets"] == 4

    fresh = updater_for(repo, tmp_path, "late")
    fresh.refresh()
    assert fresh.get_targetinfo(path) is None
    assert fresh.get_targetinfo("m/1.0.1/default/bundle.tar") is not None


@pytest.mark.parametrize(
    "bad", ["", "/abs/x.tar", "a/../b.tar", "a//b.tar", "./a.tar", "a/.hidden", "a\\b.tar", "a/b c.tar"]
)
def test_unsafe_target_paths_rejected(repo: ImageRepository, tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidTargetPath):
        repo.add_target(bad, bundle(tmp_path, "a", b"a"), CUSTOM)
    assert repo.versions()["targets"] == 1


def test_refresh_resigns_timestamp_near_expiry(repo: ImageRepository, clock: Clock) -> None:
    assert repo.refresh_expiring() == []
    assert repo.refresh_expiring(now=clock.now + timedelta(hours=11)) == []
    later = clock.now + timedelta(hours=13)  # less than half of the 24 h lifetime left
    assert repo.refresh_expiring(now=later) == ["timestamp"]
    assert repo.versions() == {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 2}
    assert repo.expires()["timestamp"] == later + timedelta(days=1)
    assert repo.refresh_expiring(now=later) == []


def test_refresh_cascades_from_targets(repo: ImageRepository, clock: Clock) -> None:
    later = clock.now + timedelta(days=46)
    assert repo.refresh_expiring(now=later) == ["targets", "snapshot", "timestamp"]
    assert repo.versions() == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    much_later = clock.now + timedelta(days=200)
    assert repo.refresh_expiring(now=much_later) == ["root", "targets", "snapshot", "timestamp"]
    assert repo.versions()["root"] == 2
    assert (repo.metadata_dir / "2.root.json").exists()
    assert repo.trusted_root()["signed"]["version"] == 2


def test_a_snapshot_that_does_not_verify_is_replaced_by_the_next_publish(
    repo: ImageRepository, tmp_path: Path, clock: Clock
) -> None:
    """A snapshot signed by a key the root does not name (written by someone else) is re-signed by
    the next publish, even one due only to renew the timestamp."""
    forged = repo._snapshot()
    forged.sign(as_signer(Ed25519PrivateKey.generate()))
    (repo.metadata_dir / "1.snapshot.json").write_bytes(forged.to_bytes())
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        updater_for(repo, tmp_path, "before").refresh()
    assert repo.refresh_expiring(now=clock.now + timedelta(hours=13)) == ["snapshot", "timestamp"]
    assert repo.versions() == {"root": 1, "targets": 1, "snapshot": 2, "timestamp": 2}
    updater_for(repo, tmp_path, "after").refresh()


def test_client_follows_refreshed_metadata(tmp_path: Path) -> None:
    """Tiny lifetimes in real time: a client pinned to root v1 follows a root and timestamp refresh."""
    repo = ImageRepository(
        tmp_path / "repo",
        tmp_path / "keys",
        root_expiry_s=4,
        targets_expiry_s=3600,
        snapshot_expiry_s=3600,
        timestamp_expiry_s=4,
    )
    repo.initialize()
    root_v1 = repo.trusted_root()
    repo.add_target("m/1.0.0/default/bundle.tar", bundle(tmp_path, "a", b"aaa"), CUSTOM)
    soon = datetime.now(UTC) + timedelta(seconds=3)
    assert repo.refresh_expiring(now=soon) == ["root", "timestamp"]
    client = tmp_path / "client"
    client.mkdir()
    (client / "root.json").write_text(json.dumps(root_v1))
    up = Updater(
        str(client), f"{BASE}/metadata/", None, f"{BASE}/targets/", DirFetcher(repo.repo_dir), bootstrap=None
    )
    up.refresh()
    assert up.get_targetinfo("m/1.0.0/default/bundle.tar") is not None
    assert json.loads((client / "root.json").read_bytes())["signed"]["version"] == 2


def test_offline_targets_key_blocks_publish_not_timestamp(
    repo: ImageRepository, tmp_path: Path, clock: Clock
) -> None:
    (repo.key_dir / ROLE_KEY_FILES["targets"]).rename(tmp_path / "offline-targets.key")
    with pytest.raises(SigningKeyUnavailable):
        repo.add_target("m/1.0.0/default/bundle.tar", bundle(tmp_path, "a", b"a"), CUSTOM)
    assert list(repo.targets_dir.rglob("*.tar")) == []
    assert repo.refresh_expiring(now=clock.now + timedelta(days=60)) == ["snapshot", "timestamp"]


def test_concurrent_threads_serialise(repo: ImageRepository, tmp_path: Path) -> None:
    files = [bundle(tmp_path, f"{i}", b"t%d" % i) for i in range(8)]
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        try:
            repo.add_target(f"m/1.0.{i}/default/bundle.tar", files[i], CUSTOM)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(repo.list_targets()) == 8
    assert repo.versions()["targets"] == 9


def _publish_in_process(repo_dir: str, key_dir: str, start: int, n: int, content_dir: str) -> None:
    repo = ImageRepository(Path(repo_dir), Path(key_dir))
    for i in range(start, start + n):
        src = Path(content_dir) / f"p{i}"
        src.write_bytes(b"p%d" % i)
        repo.add_target(f"m/2.0.{i}/default/bundle.tar", src, CUSTOM)


def test_concurrent_processes_serialise(repo: ImageRepository, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(
            target=_publish_in_process,
            args=(str(repo.repo_dir), str(repo.key_dir), k * 4, 4, str(tmp_path)),
        )
        for k in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(repo.list_targets()) == 8
    assert repo.versions()["targets"] == 9


def test_remove_keep_file_then_restore_or_purge(repo: ImageRepository, tmp_path: Path) -> None:
    path = "m/1.0.0/default/bundle.tar"
    repo.add_target(path, bundle(tmp_path, "a", b"aaa"), CUSTOM)
    stored = repo.target_file(path)
    info = repo.remove_target(path, delete_file=False)
    assert info is not None
    assert repo.get_target(path) is None
    assert stored.exists()
    repo.restore_target(info)
    assert repo.get_target(path) == info
    assert repo.versions()["targets"] == 4
    assert repo.purge_target_file(info) is False  # listed again: the file stays
    repo.remove_target(path, delete_file=False)
    assert repo.purge_target_file(info) is True
    assert not stored.exists()
    with pytest.raises(RepositoryError):
        repo.restore_target(info)


def test_leftovers_of_a_crashed_publish_are_harmless(
    repo: ImageRepository, tmp_path: Path, clock: Clock
) -> None:
    """A crash after writing N+1.targets.json (but before the timestamp) leaves an unreferenced
    file; readers never see it and the next publish overwrites it."""
    clock.now = datetime.now(UTC).replace(microsecond=0)
    (repo.metadata_dir / "2.targets.json").write_text("{half written")
    (repo.metadata_dir / "2.snapshot.json").write_text("{")
    assert repo.list_targets() == {}
    assert repo.versions()["targets"] == 1
    repo.add_target("m/1.0.0/default/bundle.tar", bundle(tmp_path, "a", b"aaa"), CUSTOM)
    assert repo.versions() == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    up = updater_for(repo, tmp_path)
    up.refresh()
    assert up.get_targetinfo("m/1.0.0/default/bundle.tar") is not None
