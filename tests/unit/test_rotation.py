"""Key rotation on a real ImageRepository, checked with python-tuf's own verification
(``Metadata.verify_delegate``) and a real ``tuf.ngclient.Updater`` that started from the ORIGINAL
(enrollment) root."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from device_client.protocol.director_keys import DIRECTOR_KEYS_TARGET, parse_director_keys
from device_client.protocol.messages import DesiredState, utcnow
from device_client.protocol.signing import key_id, verify_envelope
from server.trust.director import Director
from server.trust.keys import write_private_key
from server.trust.repository import ROLE_KEY_FILES, ImageRepository, SigningKeyUnavailable, as_signer
from server.trust.rotation import (
    RotationError,
    export_key,
    finish_pending,
    load_ed25519,
    published_director_keys,
    retire_director_key,
    rotate_director,
    rotate_tuf_role,
    status,
    tuf_keyid,
)
from tests.helpers.tuf_repo import CUSTOM, Clock, bundle, make_repo, updater_for


def md(repo: ImageRepository, name: str) -> Metadata:
    return Metadata.from_file(str(repo.metadata_dir / name))


def keyfile(repo: ImageRepository, role: str) -> Path:
    return repo.key_dir / ROLE_KEY_FILES[role]


def role_md(repo: ImageRepository, role: str) -> Metadata:
    v = repo.versions()
    return md(repo, "timestamp.json" if role == Timestamp.type else f"{v[role]}.{role}.json")


@pytest.fixture
def repo(tmp_path: Path) -> ImageRepository:
    repo = make_repo(tmp_path, Clock())
    repo.add_target("clf/1.0.0/default/bundle.tar", bundle(tmp_path, "b1", b"one" * 100), CUSTOM)
    return repo


# -- root ------------------------------------------------------------------------------------------
def test_rotate_root_twice_each_version_signed_by_old_and_new(repo: ImageRepository) -> None:
    k1 = load_ed25519(keyfile(repo, Root.type))
    first = rotate_tuf_role(repo, Root.type)
    k2 = load_ed25519(keyfile(repo, Root.type))
    second = rotate_tuf_role(repo, Root.type)
    k3 = load_ed25519(keyfile(repo, Root.type))
    assert (first.root_version, second.root_version) == (2, 3)
    assert len({tuf_keyid(k) for k in (k1, k2, k3)}) == 3
    r1, r2, r3 = (md(repo, f"{n}.root.json") for n in (1, 2, 3))
    assert r2.signed.roles["root"].keyids == [tuf_keyid(k2)]
    assert set(r2.signatures) == {tuf_keyid(k1), tuf_keyid(k2)}
    assert set(r3.signatures) == {tuf_keyid(k2), tuf_keyid(k3)}
    # the TUF chain: each root verifies under its predecessor and under itself ...
    r1.verify_delegate("root", r2)
    r2.verify_delegate("root", r2)
    r2.verify_delegate("root", r3)
    r3.verify_delegate("root", r3)
    # ... but not skipping a link: root 1's key did not sign root 3
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        r1.verify_delegate("root", r3)
    # the old root key is gone from key_dir and no longer a root key
    assert stat.S_IMODE(keyfile(repo, Root.type).stat().st_mode) == 0o600
    assert repo.versions()["root"] == 3
    assert json.loads((repo.metadata_dir / "root.json").read_bytes())["signed"]["version"] == 3
    with pytest.raises(SigningKeyUnavailable), repo.using_keys({Root.type: k1}):
        repo._signer(Root.type, r3.signed)


def test_ngclient_holding_the_original_root_walks_to_n_plus_2_and_downloads(
    repo: ImageRepository, tmp_path: Path
) -> None:
    device = updater_for(repo, tmp_path, "device")  # pins root v1, as at enrollment
    device.refresh()
    rotate_tuf_role(repo, Root.type)
    rotate_tuf_role(repo, Root.type)
    # a timestamp key change signed by the v3 root key: only a client that walked 1 -> 2 -> 3 -> 4
    # knows the new timestamp key (keeping root v1 would refuse the new timestamp)
    rotate_tuf_role(repo, Timestamp.type)
    info = repo.add_target("clf/2.0.0/default/bundle.tar", bundle(tmp_path, "b2", b"two" * 100), CUSTOM)

    client_dir = tmp_path / "device"
    again = _reopen(device, client_dir)
    again.refresh()
    fetched = {u.rsplit("/", 1)[1] for u in device._fetcher.urls}
    assert {"2.root.json", "3.root.json", "4.root.json"} <= fetched
    assert json.loads((client_dir / "root.json").read_bytes())["signed"]["version"] == 4
    got = again.get_targetinfo("clf/2.0.0/default/bundle.tar")
    assert got == info
    path = again.download_target(got)
    assert Path(path).read_bytes() == b"two" * 100


def test_a_new_root_signed_only_by_the_new_key_is_refused(repo: ImageRepository, tmp_path: Path) -> None:
    device = updater_for(repo, tmp_path, "device")
    rotate_tuf_role(repo, Root.type)
    r2 = md(repo, "2.root.json")
    new_keyid = r2.signed.roles["root"].keyids[0]
    r2.signatures = {new_keyid: r2.signatures[new_keyid]}  # drop the old root's signature
    (repo.metadata_dir / "2.root.json").write_bytes(r2.to_bytes())
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        device.refresh()


# -- timestamp, snapshot, targets ------------------------------------------------------------------
ROLE_BUMPS = {
    Timestamp.type: {"root": 1, "timestamp": 1, "snapshot": 0, "targets": 0},
    Snapshot.type: {"root": 1, "timestamp": 1, "snapshot": 1, "targets": 0},
    Targets.type: {"root": 1, "timestamp": 1, "snapshot": 1, "targets": 1},
}


@pytest.mark.parametrize("role", [Timestamp.type, Snapshot.type, Targets.type])
def test_rotate_online_role_then_device_follows_and_retired_key_is_refused(
    repo: ImageRepository, tmp_path: Path, role: str
) -> None:
    device = updater_for(repo, tmp_path, "device")
    device.refresh()  # the device trusts the pre-rotation metadata
    before = repo.versions()
    old = load_ed25519(keyfile(repo, role))
    done = rotate_tuf_role(repo, role)
    new = load_ed25519(keyfile(repo, role))
    assert done.new_keyid == tuf_keyid(new) != tuf_keyid(old)
    after = repo.versions()
    assert {r: after[r] - before[r] for r in after} == ROLE_BUMPS[role]

    root = md(repo, f"{after['root']}.root.json")
    assert root.signed.roles[role].keyids == [tuf_keyid(new)]
    assert tuf_keyid(old) not in root.signed.keys
    md(repo, f"{before['root']}.root.json").verify_delegate("root", root)
    # the transition version carries both signatures, so it verifies under the old and new root
    transition = role_md(repo, role)
    assert set(transition.signatures) == {tuf_keyid(old), tuf_keyid(new)}
    root.verify_delegate(role, transition)
    md(repo, f"{before['root']}.root.json").verify_delegate(role, transition)

    # from now on the new key alone signs
    repo.add_target("clf/2.0.0/default/bundle.tar", bundle(tmp_path, "b2", b"two" * 100), CUSTOM)
    assert set(role_md(repo, role).signatures) == {tuf_keyid(new)}
    fresh = updater_for(repo, tmp_path, "fresh")
    fresh.refresh()
    assert fresh.get_targetinfo("clf/2.0.0/default/bundle.tar") is not None
    device = _reopen(device, tmp_path / "device")
    device.refresh()
    assert device.get_targetinfo("clf/2.0.0/default/bundle.tar") is not None

    # metadata signed by the retired key alone: refused by python-tuf and by the device
    forged = role_md(repo, role)
    forged.sign(as_signer(old))
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        root.verify_delegate(role, forged)
    _forge_publish(repo, role, old)
    device = _reopen(device, tmp_path / "device")
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        device.refresh()


def _reopen(updater, client_dir: Path):
    """A new Updater on the same local metadata (ngclient refreshes once per instance)."""
    from tuf.ngclient import Updater

    return Updater(
        metadata_dir=str(client_dir),
        metadata_base_url=updater._metadata_base_url,
        target_dir=str(client_dir / "targets"),
        target_base_url=updater._target_base_url,
        fetcher=updater._fetcher,
        bootstrap=None,
    )


def _forge_publish(repo: ImageRepository, role: str, retired: Ed25519PrivateKey) -> None:
    """An attacker holding the retired key of ``role`` (and write access to the repository, and
    the other online keys) publishes the next versions with ``role`` signed by the retired key."""
    root = repo._root().signed
    repo._transition = {role: [as_signer(retired)]}
    try:
        targets = repo._targets() if role == Targets.type else None
        repo._publish(root, repo._clock(), targets, force_snapshot=role != Timestamp.type)
    finally:
        repo._transition = {}


# -- offline root and targets ----------------------------------------------------------------------
def test_offline_root_and_targets_workflow(repo: ImageRepository, tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    export_key(repo, Root.type, vault / "root.key")
    export_key(repo, Targets.type, vault / "targets.key")
    for name in ("root.key", "targets.key"):
        assert stat.S_IMODE((vault / name).stat().st_mode) == 0o600
    assert not keyfile(repo, Root.type).exists()
    assert not keyfile(repo, Targets.type).exists()
    st = {r.role: r.online for r in status(repo).roles}
    assert st == {"root": False, "targets": False, "snapshot": True, "timestamp": True, "director": False}
    with pytest.raises(RotationError, match="must stay online"):
        export_key(repo, Timestamp.type, vault / "ts.key")

    # publishing needs the targets key; lending it for one operation works
    b2 = bundle(tmp_path, "b2", b"two" * 100)
    with pytest.raises(SigningKeyUnavailable):
        repo.add_target("clf/2.0.0/default/bundle.tar", b2, CUSTOM)
    with repo.using_keys({Targets.type: load_ed25519(vault / "targets.key")}):
        repo.add_target("clf/2.0.0/default/bundle.tar", b2, CUSTOM)
    assert not repo.has_key(Targets.type)  # lent only inside the block

    # rotating anything needs the root key
    with pytest.raises(RotationError, match="--root-key"):
        rotate_tuf_role(repo, Timestamp.type)
    rotate_tuf_role(repo, Timestamp.type, root_key=vault / "root.key")
    # the offline targets key: the new one goes to --out, never into key_dir
    with pytest.raises(RotationError, match="--out"):
        rotate_tuf_role(repo, Targets.type, root_key=vault / "root.key", targets_key=vault / "targets.key")
    done = rotate_tuf_role(
        repo,
        Targets.type,
        root_key=vault / "root.key",
        targets_key=vault / "targets.key",
        out=vault / "targets-2.key",
    )
    assert done.new_key_file == vault / "targets-2.key"
    assert stat.S_IMODE((vault / "targets-2.key").stat().st_mode) == 0o600
    assert not keyfile(repo, Targets.type).exists()
    assert (vault / "targets.key").exists()  # the operator's media is not touched
    with (
        pytest.raises(SigningKeyUnavailable),
        repo.using_keys({Targets.type: load_ed25519(vault / "targets.key")}),
    ):
        repo.add_target("clf/3.0.0/default/bundle.tar", bundle(tmp_path, "b3", b"3" * 100), CUSTOM)
    with repo.using_keys({Targets.type: load_ed25519(vault / "targets-2.key")}):
        repo.add_target("clf/3.0.0/default/bundle.tar", bundle(tmp_path, "b3", b"3" * 100), CUSTOM)
    # the offline root key too
    done = rotate_tuf_role(repo, Root.type, root_key=vault / "root.key", out=vault / "root-2.key")
    assert not keyfile(repo, Root.type).exists()
    assert (
        tuf_keyid(load_ed25519(vault / "root-2.key"))
        == md(repo, f"{done.root_version}.root.json").signed.roles["root"].keyids[0]
    )
    client = updater_for(repo, tmp_path, "late")
    client.refresh()
    assert client.get_targetinfo("clf/3.0.0/default/bundle.tar") is not None


def test_interrupted_rotation_is_completed_or_discarded(repo: ImageRepository) -> None:
    stray = Ed25519PrivateKey.generate()
    write_private_key(repo.key_dir / "tuf-timestamp.key.new", stray)
    assert any("discarded" in m for m in finish_pending(repo))
    assert not (repo.key_dir / "tuf-timestamp.key.new").exists()
    # a crash after the new root was written but before the key file was renamed
    new = Ed25519PrivateKey.generate()
    write_private_key(repo.key_dir / "tuf-timestamp.key.new", new)
    repo.rotate_role(Timestamp.type, new)
    with pytest.raises(SigningKeyUnavailable):
        repo.refresh_expiring(repo._clock() + repo.lifetimes["timestamp"])
    assert any("completed" in m for m in finish_pending(repo))
    assert repo.refresh_expiring(repo._clock() + repo.lifetimes["timestamp"]) == ["timestamp"]
    assert status(repo).pending == []


def test_a_failed_rotation_leaves_no_pending_key(repo: ImageRepository, tmp_path: Path) -> None:
    # the root key passed is not the root's: the new targets key is written, then refused
    wrong = tmp_path / "not-root.key"
    write_private_key(wrong, Ed25519PrivateKey.generate())
    old = keyfile(repo, Targets.type).read_bytes()
    versions = repo.versions()
    with pytest.raises(SigningKeyUnavailable):
        rotate_tuf_role(repo, Targets.type, root_key=wrong)
    assert not (repo.key_dir / "tuf-targets.key.new").exists()
    assert keyfile(repo, Targets.type).read_bytes() == old
    assert repo.versions() == versions
    assert status(repo).pending == []


# -- director --------------------------------------------------------------------------------------
def _desired() -> DesiredState:
    now = utcnow()
    return DesiredState.build(
        device_id="d1",
        seq=1,
        issued_at=now,
        expires_at=now.replace(year=now.year + 1),
        rollout_id=None,
        model="clf",
        version="1.0.0",
        release=1,
        variant="default",
        target="clf/1.0.0/default/bundle.tar",
        length=1,
        hashes={"sha256": "0" * 64},
    )


def test_rotate_and_retire_the_director_key(repo: ImageRepository) -> None:
    director = Director(repo.key_dir)  # a running server's director, loaded before the rotation
    old = director.key.public_key()
    assert published_director_keys(repo) is None
    done = rotate_director(repo)
    listed = published_director_keys(repo)
    assert listed is not None
    assert listed.version == 1
    assert listed.keyids == [done.new_keyid, key_id(old)]
    info = repo.get_target(DIRECTOR_KEYS_TARGET)
    assert info is not None
    assert info.custom == {"fleetota": "director-keys"}
    # the running director signs with the new key from its next signature on
    envelope = director.sign(_desired())
    assert envelope["signatures"][0]["keyid"] == done.new_keyid == director.key_id
    verify_envelope(envelope, list(listed.keys))
    assert stat.S_IMODE((repo.key_dir / "director.key").stat().st_mode) == 0o600

    with pytest.raises(RotationError, match="signs with now"):
        retire_director_key(repo, done.new_keyid)
    after = retire_director_key(repo, key_id(old)[:12])
    assert after.version == 2
    assert after.keyids == [done.new_keyid]
    assert parse_director_keys(repo.target_file(DIRECTOR_KEYS_TARGET).read_bytes()).keyids == [done.new_keyid]
    # a second rotation keeps the overlap ordering: newest first
    again = rotate_director(repo)
    assert published_director_keys(repo).keyids == [again.new_keyid, done.new_keyid]


def test_director_rotation_with_an_offline_targets_key(repo: ImageRepository, tmp_path: Path) -> None:
    Director(repo.key_dir)
    export_key(repo, Targets.type, tmp_path / "targets.key")
    with pytest.raises(SigningKeyUnavailable):
        rotate_director(repo)
    assert not (repo.key_dir / "director.key.new").exists()  # nothing half-done
    done = rotate_director(repo, targets_key=tmp_path / "targets.key")
    assert published_director_keys(repo).primary == done.new_keyid


# -- the CLI ---------------------------------------------------------------------------------------
def test_fleet_keys_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import main
    from server.config import Settings

    monkeypatch.setenv("FLEET_DATA_DIR", str(tmp_path / "data"))
    settings = Settings()
    ImageRepository(settings.repo_dir, settings.key_dir).initialize()
    Director(settings.key_dir)
    run = CliRunner().invoke

    out = run(main, ["keys", "status", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert [r["role"] for r in doc["roles"]] == ["root", "targets", "snapshot", "timestamp", "director"]
    assert all(r["online"] for r in doc["roles"])

    out = run(main, ["keys", "export", "root", "--out", str(tmp_path / "off" / "root.key")])
    assert out.exit_code == 0, out.output
    out = run(main, ["keys", "rotate", "snapshot"])
    assert out.exit_code == 1
    assert "--root-key" in out.output
    out = run(main, ["keys", "rotate", "snapshot", "--root-key", str(tmp_path / "off" / "root.key")])
    assert out.exit_code == 0, out.output
    assert "root v2" in out.output
    out = run(main, ["keys", "rotate", "director"])
    assert out.exit_code == 0, out.output
    old = json.loads(run(main, ["keys", "status", "--json"]).output)
    assert old["director_list_version"] == 1
    assert len(old["director_list"]) == 2
    out = run(main, ["keys", "retire-director", old["director_list"][1][:16]])
    assert out.exit_code == 0, out.output
    now = json.loads(run(main, ["keys", "status", "--json"]).output)
    assert now["director_list"] == old["director_list"][:1]
    assert {r["role"]: r["online"] for r in now["roles"]}["root"] is False
    assert run(main, ["keys", "status"]).exit_code == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_offline_targets_key_publish_window_through_the_api(
    app_client, ctx, admin_headers, onnx_model, tmp_path
):
    """Push with the targets key offline: staged (pending, listed nowhere a device trusts); copied
    in for a publish window, the next push publishes both; exported again afterwards. (Signing
    without a window, on a workstation: tests/server/test_offline_signing.py.)"""
    import shutil

    vault = tmp_path / "vault" / "targets.key"
    export_key(ctx.repo, Targets.type, vault)
    model = onnx_model().read_bytes()

    def push(version: str):
        files = {"file": ("model.onnx", model, "application/octet-stream")}
        return app_client.post(
            "/api/v1/models/clf/versions", data={"version": version}, files=files, headers=admin_headers
        )

    r = push("1.0.0")
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "pending"
    assert ctx.repo.list_targets() == {}
    assert ctx.repo.versions()["targets"] == 1

    shutil.copy(vault, keyfile(ctx.repo, Targets.type))  # the publish window opens
    keyfile(ctx.repo, Targets.type).chmod(0o600)
    assert push("1.1.0").status_code == 201
    export_key(ctx.repo, Targets.type, tmp_path / "vault" / "targets-again.key")  # and closes
    assert not ctx.repo.has_key(Targets.type)
    assert sorted(p.split("/")[1] for p in ctx.repo.list_targets()) == ["1.0.0", "1.1.0"]
    statuses = {v["version"]: v["status"] for v in app_client.get(
        "/api/v1/models/clf/versions", headers=admin_headers).json()}
    assert statuses == {"1.0.0": "active", "1.1.0": "active"}
