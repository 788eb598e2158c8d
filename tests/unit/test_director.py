"""When a running Director notices a replaced ``director.key``: a rotation made by another process
(the CLI, another replica) within its check interval, one made in its own process at once, and
between checks it signs without touching the file (an injected clock; no sleeping)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_client.protocol.messages import DesiredState, utcnow
from device_client.protocol.signing import key_id, verify_envelope
from server.trust.director import CHECK_INTERVAL_S, Director
from server.trust.keys import load_private_key, write_private_key
from server.trust.rotation import finish_pending, publish_director_keys, rotate_director
from tests.helpers.tuf_repo import make_repo

ROOT = Path(__file__).resolve().parents[2]

#: what ``fleet keys rotate director`` does to the key file, in a process of its own
OTHER_PROCESS_ROTATION = """
import os, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from server.trust.keys import write_private_key

dest = Path(sys.argv[1]) / "director.key"
pending = dest.with_name("director.key.new")
write_private_key(pending, Ed25519PrivateKey.generate())
os.replace(pending, dest)
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _desired() -> DesiredState:
    now = utcnow()
    return DesiredState.build(
        device_id="dev-1", seq=1, issued_at=now, expires_at=now, model="clf", version="1.0.0", release=1,
        target="clf/1.0.0/default/bundle.tar", length=1, hashes={"sha256": "0" * 64},
    )  # fmt: skip


def _signer(director: Director) -> str:
    """The key id of the signature a real signing produces (checked against the key on disk)."""
    envelope = director.sign(_desired())
    return envelope["signatures"][0]["keyid"]


def _on_disk(key_dir: Path) -> Ed25519PrivateKey:
    key = load_private_key(key_dir / "director.key")
    assert isinstance(key, Ed25519PrivateKey)
    return key


def _rotate_in_another_process(key_dir: Path) -> None:
    subprocess.run(
        [sys.executable, "-c", OTHER_PROCESS_ROTATION, str(key_dir)], cwd=ROOT, check=True, timeout=60
    )


@pytest.fixture
def stats(monkeypatch):
    """Counts the ``stat`` calls made on a ``director.key``."""
    calls: list[str] = []
    real = os.stat

    def counting(path, *args, **kwargs):
        if str(path).endswith("director.key"):
            calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting)
    return calls


def test_a_rotation_by_another_process_is_seen_after_the_check_interval(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    clock = Clock()
    start = clock.now
    director = Director(keys, clock=clock)
    clock.now = start + CHECK_INTERVAL_S / 2
    replica = Director(keys, clock=clock)  # another server on the same key directory
    old = key_id(_on_disk(keys).public_key())
    assert _signer(director) == _signer(replica) == old

    _rotate_in_another_process(keys)
    new_key = _on_disk(keys)
    new = key_id(new_key.public_key())
    assert new != old
    # within their interval both still sign with the key they hold (the price of not statting
    # the file for every signature)
    assert _signer(director) == _signer(replica) == old
    clock.now = start + CHECK_INTERVAL_S * 3 / 4
    assert _signer(director) == _signer(replica) == old
    clock.now = start + CHECK_INTERVAL_S  # the first director's interval is over: it looks, switches
    envelope = director.sign(_desired())
    assert envelope["signatures"][0]["keyid"] == new == director.key_id
    verify_envelope(envelope, [new_key.public_key()])
    assert _signer(replica) == old  # its interval started half an interval later
    clock.now = start + CHECK_INTERVAL_S * 3 / 2
    assert _signer(replica) == new


def test_between_checks_signing_does_not_touch_the_key_file(tmp_path: Path, stats: list[str]) -> None:
    clock = Clock()
    director = Director(tmp_path / "keys", clock=clock)
    stats.clear()
    for _ in range(500):
        director.sign(_desired())
    assert stats == []
    clock.now += CHECK_INTERVAL_S
    for _ in range(500):
        director.sign(_desired())
    assert len(stats) == 1  # one check per interval, however many signatures


def test_a_rotation_in_this_process_is_seen_at_once(tmp_path: Path, stats: list[str]) -> None:
    repo = make_repo(tmp_path)
    clock = Clock()  # never advances: only the rotation's own signal can make them look
    director, replica = Director(repo.key_dir, clock=clock), Director(repo.key_dir, clock=clock)
    old = director.key_id
    done = rotate_director(repo)
    assert _signer(director) == _signer(replica) == done.new_keyid != old

    # an interrupted rotation completed by ``finish_pending`` (the key was already published)
    pending = Ed25519PrivateKey.generate()
    publish_director_keys(repo, [pending.public_key(), _on_disk(repo.key_dir).public_key()])
    write_private_key(repo.key_dir / "director.key.new", pending)
    assert _signer(director) == done.new_keyid
    finish_pending(repo)
    assert _signer(director) == _signer(replica) == key_id(pending.public_key())
    # having looked once after the signal, they do not look again within the interval
    stats.clear()
    assert _signer(director) == _signer(replica) == key_id(pending.public_key())
    assert stats == []
