"""Secrets at rest: key directories that exist already are tightened on start, and no write
follows a symlink planted where it puts its temp file.

protection: ``device_client.protocol.fsutil`` (``private_dir``, ``create_temp``/``atomic_write``:
a random temp name opened ``O_CREAT|O_EXCL|O_NOFOLLOW``), called by ``ServerContext.open``,
``write_broker_config``, ``write_private_key`` and ``Identity.load``; ``StateStore.save`` removes
whatever sits at its temp path and creates it anew the same way.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest

from device_client.daemon import Daemon
from device_client.protocol.fsutil import atomic_write, private_dir
from device_client.state import DeviceState
from device_client.store import TMP_FILE, StateStore
from server.runner import start_embedded_broker
from server.trust.repository import ImageRepository, consistent_target_name
from tests.helpers.bundles import make_bundle
from tests.helpers.device_fleet import device_settings, enroll_device
from tests.helpers.live_server import LiveServer


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _loosen(directory: Path, files: list[Path]) -> None:
    os.chmod(directory, 0o755)
    for f in files:
        os.chmod(f, 0o644)


@pytest.mark.mqtt
def test_existing_key_directories_are_tightened_on_start(live_settings, tmp_path):
    s = live_settings
    dev_dir = tmp_path / "dev"
    broker = start_embedded_broker(s)
    server = LiveServer(s).start()
    try:
        enroll_device(server, dev_dir, "edge-rest")
    finally:
        server.stop()
        broker.stop()

    # a restore, a copy or an older release left everything readable by others
    server_keys = sorted(s.key_dir.glob("*.key"))
    broker_keys = sorted(s.broker_dir.glob("*.key"))
    (dev_dir / "api-token").write_text("local-api-token-0123456789")
    device_secrets = [dev_dir / "device.key", dev_dir / "identity.json", dev_dir / "api-token"]
    assert len(server_keys) >= 6
    assert len(broker_keys) == 2
    _loosen(s.key_dir, server_keys)
    _loosen(s.broker_dir, broker_keys)
    _loosen(dev_dir, device_secrets)
    public = [s.broker_dir / "ca.crt", dev_dir / "device.crt"]
    modes_before = {p: _mode(p) for p in public}

    broker = start_embedded_broker(s)
    server = LiveServer(s).start()
    daemon = Daemon(device_settings(dev_dir)).start()
    try:
        for d in (s.key_dir, s.broker_dir, dev_dir):
            assert _mode(d) == 0o700, f"{d} is {_mode(d):o}"
        for f in (*server_keys, *broker_keys, *device_secrets):
            assert _mode(f) == 0o600, f"{f} is {_mode(f):o}"
        assert {p: _mode(p) for p in public} == modes_before  # certificates are public: untouched
    finally:
        daemon.stop()
        server.stop()
        broker.stop()


def test_atomic_write_never_follows_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    # where the temp file used to be, predictably; and the target itself
    (keys / ".director.key.tmp").symlink_to(victim)
    atomic_write(keys / "director.key", b"secret", 0o600)
    assert victim.read_bytes() == b"precious"
    assert (keys / "director.key").read_bytes() == b"secret"
    assert _mode(keys / "director.key") == 0o600
    (keys / "ca.crt").symlink_to(victim)
    atomic_write(keys / "ca.crt", b"cert")
    assert victim.read_bytes() == b"precious"
    assert not (keys / "ca.crt").is_symlink()
    assert (keys / "ca.crt").read_bytes() == b"cert"
    leftovers = {p.name for p in keys.iterdir()} - {"director.key", "ca.crt", ".director.key.tmp"}
    assert leftovers == set()  # no temp file is left behind


def test_the_state_store_never_follows_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    data = tmp_path / "data"
    data.mkdir()
    (data / TMP_FILE).symlink_to(victim)
    store = StateStore(data)
    store.save(DeviceState(report_seq=7))
    assert victim.read_bytes() == b"precious"
    assert store.load().state.report_seq == 7
    assert not (data / TMP_FILE).exists()


def test_publishing_a_target_never_follows_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    repo = ImageRepository(tmp_path / "repo", tmp_path / "keys")
    repo.initialize()
    tar, _ = make_bundle(tmp_path / "bundle", name="clf", version="1.0.0")
    path = "clf/1.0.0/default/bundle.tar"
    dest = repo.targets_dir / consistent_target_name(path, hashlib.sha256(tar.read_bytes()).hexdigest())
    dest.parent.mkdir(parents=True)
    # the temp name a publish in this thread used to take
    (dest.parent / f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp").symlink_to(victim)
    repo.add_target(path, tar, {"model": "clf", "version": "1.0.0", "release": 1, "variant": "default"})
    assert victim.read_bytes() == b"precious"
    assert repo.target_file(path).read_bytes() == tar.read_bytes()


def test_tightening_only_ever_removes_permission_bits(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o750)
    os.chmod(keys, 0o750)
    (keys / "a.key").write_bytes(b"a")
    os.chmod(keys / "a.key", 0o400)  # stricter than asked: left as it is
    (keys / "b.key").write_bytes(b"b")
    os.chmod(keys / "b.key", 0o664)
    (keys / "c.key").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_bytes(b"x")
    os.chmod(tmp_path / "elsewhere", 0o644)
    changes = private_dir(keys, ("*.key",))
    assert changes == [f"{keys}: 750 -> 700", f"{keys / 'b.key'}: 664 -> 600"]
    assert (_mode(keys), _mode(keys / "a.key"), _mode(keys / "b.key")) == (0o700, 0o400, 0o600)
    assert _mode(tmp_path / "elsewhere") == 0o644  # a link's target is not ours to change
    assert private_dir(keys, ("*.key",)) == []
