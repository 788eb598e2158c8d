"""Crash-safe state file and model slots: corruption, crashes between steps, slots and GC."""

from __future__ import annotations

import errno
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_client import state as sm
from device_client.protocol import BundleError, DesiredState
from device_client.state import DeviceState, Slot
from device_client.store import TMP_FILE, CorruptState, DiskFull, StateStore, decode_state, encode_state
from tests.helpers.bundles import make_bundle

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def state_with(version: str, seq: int = 1) -> DeviceState:
    slot = Slot(model="clf", version=version, release=1, path=f"models/clf/{version}-default")
    return DeviceState(current={"clf": slot}, last_desired_seq=seq, report_seq=seq)


def test_round_trip_and_prev_copy(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load().source == "empty"
    a, b = state_with("1.0.0", 1), state_with("2.0.0", 2)
    store.save(a)
    store.save(b)
    res = store.load()
    assert (res.source, res.state) == ("primary", b)
    assert decode_state(store.prev_path.read_bytes()) == a
    assert not (tmp_path / TMP_FILE).exists()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: d[: len(d) // 2], id="truncated"),
        pytest.param(lambda d: b"", id="empty"),
        pytest.param(lambda d: d.replace(b"2.0.0", b"2.0.1"), id="flipped-value"),
        pytest.param(lambda d: bytes([d[0] ^ 0xFF]) + d[1:], id="flipped-first-byte"),
        pytest.param(lambda d: os.urandom(len(d)), id="garbage"),
        pytest.param(
            lambda d: b'{"format": "fleet.device-state/1", "sha256": "x", "state": {}}', id="bad-sum"
        ),
    ],
)
def test_corrupt_primary_falls_back_to_previous(tmp_path: Path, damage) -> None:
    store = StateStore(tmp_path)
    store.save(state_with("1.0.0", 1))
    store.save(state_with("2.0.0", 2))
    store.state_path.write_bytes(damage(store.state_path.read_bytes()))
    res = store.load()
    assert res.source == "previous"
    assert res.state.current["clf"].version == "1.0.0"
    assert res.problems
    # the next save must not rotate the corrupt file over the good previous copy
    store.save(state_with("3.0.0", 3))
    assert decode_state(store.prev_path.read_bytes()).current["clf"].version == "1.0.0"
    assert store.load().state.current["clf"].version == "3.0.0"


def test_checksum_detects_semantic_edit() -> None:
    data = encode_state(state_with("1.0.0"))
    with pytest.raises(CorruptState, match="checksum"):
        decode_state(data.replace(b'"report_seq": 1', b'"report_seq": 7'))


def test_crash_between_temp_write_and_replace(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(state_with("1.0.0", 1))
    # a crash after writing the temp file but before any rename: the temp file is ignored
    (tmp_path / TMP_FILE).write_bytes(encode_state(state_with("2.0.0", 2))[:40])
    assert store.load().state.current["clf"].version == "1.0.0"
    store.save(state_with("2.0.0", 2))
    assert store.load().state.current["clf"].version == "2.0.0"


def test_crash_between_rotate_and_replace(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(state_with("1.0.0", 1))
    os.replace(store.state_path, store.prev_path)  # what save() does first
    res = store.load()
    assert res.source == "previous"
    assert res.state.current["clf"].version == "1.0.0"


def test_both_bad_starts_fresh_and_adopts_installed_slots(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for version, release in (("1.0.0", 1), ("1.1.0", 2)):
        tar, _ = make_bundle(tmp_path / "src", version=version, release=release)
        store.install_bundle(tar)
    store.save(state_with("1.1.0"))
    store.save(state_with("1.1.0"))
    store.state_path.write_bytes(b"garbage")
    store.prev_path.write_bytes(b"{}")
    res = store.load()
    assert res.source == "fresh"
    assert len(res.problems) == 2
    assert res.state.current["clf"].version == "1.1.0"
    assert res.state.previous["clf"].version == "1.0.0"
    assert store.slot_dir(res.state.current["clf"]).joinpath("model.onnx").is_file()


def test_install_bundle_makes_a_slot_and_reuses_identical(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    tar, manifest = make_bundle(tmp_path / "src")
    slot = store.install_bundle(tar)
    assert slot.path == "models/clf/1.0.0-default"
    assert (slot.model, slot.version, slot.release) == ("clf", "1.0.0", manifest.release)
    d = store.slot_dir(slot)
    assert sorted(p.name for p in d.iterdir()) == ["bundle.json", "model.onnx", "validation.npz"]
    inode = (d / "model.onnx").stat().st_ino
    assert store.install_bundle(tar) == slot
    assert (d / "model.onnx").stat().st_ino == inode
    assert list(store.staging_dir.iterdir()) == []


def test_install_bundle_replace_extracts_over_a_damaged_slot(tmp_path: Path) -> None:
    """A slot whose bundle.json is intact but whose model file is damaged (it did not load) is
    extracted afresh with ``replace``, not reused because its manifest matches."""
    store = StateStore(tmp_path)
    tar, _ = make_bundle(tmp_path / "src")
    slot = store.install_bundle(tar)
    model = store.slot_dir(slot) / "model.onnx"
    good = model.read_bytes()
    model.write_bytes(b"damaged")
    assert store.install_bundle(tar, replace=True) == slot
    assert model.read_bytes() == good
    assert list(store.staging_dir.iterdir()) == []


def test_install_rejects_bad_bundle_and_cleans_staging(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    tar, _ = make_bundle(tmp_path / "src")
    tar.write_bytes(tar.read_bytes()[:2300])  # cut inside model.onnx
    with pytest.raises(BundleError):
        store.install_bundle(tar)
    assert list(store.staging_dir.iterdir()) == []
    assert store.scan_slots() == []


def test_gc_keeps_current_previous_candidate_and_inflight_download(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    slots = {}
    for i in range(4):
        tar, _ = make_bundle(tmp_path / "src", version=f"1.{i}.0", release=i + 1)
        slots[i] = store.install_bundle(tar)
    desired = DesiredState.build(
        device_id="d1", seq=1, issued_at=T0, expires_at=T0 + timedelta(hours=1), model="clf",
        version="1.3.0", release=4, target="t", length=1, hashes={"sha256": "a" * 64},
    )
    partial, final = store.download_paths("clf", "1.3.0", "default", "a" * 64)
    st = DeviceState(current={"clf": slots[1]}, previous={"clf": slots[0]})
    st = sm.accept(st, desired, T0, store.relpath(partial))
    st = sm.downloaded(st, T0, store.relpath(final))
    st = sm.verified(st, T0, slots[3])
    final.write_bytes(b"bundle")
    (store.downloads_dir / "stale.tar.partial").write_bytes(b"x")
    (store.staging_dir / "leftover").mkdir()
    removed = store.gc(st)
    assert store.slot_dir(slots[2]) in removed
    assert not store.slot_dir(slots[2]).exists()
    for i in (0, 1, 3):
        assert store.slot_dir(slots[i]).is_dir()
    assert final.exists()
    assert not (store.downloads_dir / "stale.tar.partial").exists()
    assert list(store.staging_dir.iterdir()) == []


def test_gc_keeps_a_download_finished_just_before_a_kill(tmp_path: Path) -> None:
    # kill -9 after the download renamed .partial to its final name, before ``downloaded`` was
    # committed: the state still names the partial path; the complete file must survive the gc
    store = StateStore(tmp_path)
    desired = DesiredState.build(
        device_id="d1", seq=1, issued_at=T0, expires_at=T0 + timedelta(hours=1), model="clf",
        version="1.3.0", release=4, target="t", length=6, hashes={"sha256": "a" * 64},
    )
    partial, final = store.download_paths("clf", "1.3.0", "default", "a" * 64)
    st = sm.accept(DeviceState(), desired, T0, store.relpath(partial))
    final.write_bytes(b"bundle")
    other = store.downloads_dir / "clf-1.2.0-default-bbbbbbbbbbbbbbbb.tar"
    other.write_bytes(b"old")
    assert store.gc(st) == [other]
    assert final.read_bytes() == b"bundle"


class _FullDisk:
    """Make ``os.fsync`` fail like a full file system for the duration of a block."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_is_a_clear_error_and_keeps_old_state(tmp_path: Path, monkeypatch) -> None:
    store = StateStore(tmp_path)
    store.save(state_with("1.0.0"))
    with monkeypatch.context() as m:
        _FullDisk(m)
        with pytest.raises(DiskFull, match="disk full while saving state"):
            store.save(state_with("2.0.0"))
    assert not (tmp_path / TMP_FILE).exists()
    assert store.load().state.current["clf"].version == "1.0.0"


def test_disk_full_during_extraction(tmp_path: Path, monkeypatch) -> None:
    store = StateStore(tmp_path)
    tar, _ = make_bundle(tmp_path / "src")
    with monkeypatch.context() as m:
        _FullDisk(m)
        with pytest.raises(DiskFull):
            store.install_bundle(tar)
    assert list(store.staging_dir.iterdir()) == []
