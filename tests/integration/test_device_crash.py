"""kill -9 of a real daemon process (``fleet device run``) mid-download and
mid-probation: the restarted daemon resumes the download with an HTTP Range request, and reverts a
model that was on probation to the last known good one, reporting ``rolled_back``. A killed daemon
says no goodbye: the broker publishes its MQTT last will and the server marks the device offline."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import numpy as np
import pytest

from device_client.daemon import Daemon
from device_client.daemon import updater as daemon_module
from device_client.state import UpdatePhase
from device_client.store import DiskFull, StateStore
from tests.helpers.device_fleet import (
    DaemonProcess,
    assign,
    desired_for,
    device_record,
    device_settings,
    enroll_device,
    events,
    infer,
    outcome_for,
    push_model,
    serving_version,
    wait_event,
    wait_for,
)
from tests.helpers.onnx_models import make_model

pytestmark = pytest.mark.mqtt

QUICK = {"seconds": 0.2, "min_requests": 0}


def installed_slot(live, tmp_path: Path, device_id: str, scales: dict[str, float]) -> tuple[Path, Path]:
    """Enroll ``device_id`` in ``tmp_path / "dev"``, install each version of ``clf`` in turn (its
    model built with that scale) with a daemon that is then stopped; return the data dir and the
    current slot's directory."""
    data = tmp_path / "dev"
    enroll_device(live, data, device_id)
    for version, scale in scales.items():
        push_model(live, "clf", version, make_model(tmp_path / f"v{version}.onnx", scale=scale))
    first = Daemon(device_settings(data)).start()
    try:
        for version in scales:
            seq = assign(live, device_id, "clf", version, probation=QUICK)["seq"]
            assert outcome_for(live, device_id, seq)["phase"] == "succeeded"
        wait_for(lambda: first.state.update is None, what="the update cleared")
    finally:
        first.stop()
    return data, data / StateStore(data).load().state.current["clf"].path


def enrolled_with_v1(live, tmp_path: Path, device_id: str) -> Path:
    """``device_id`` enrolled with its data dir at ``tmp_path/dev``, and clf 1.0.0 published (the
    start most tests here share); returns the data dir."""
    data = tmp_path / "dev"
    enroll_device(live, data, device_id)
    push_model(live, "clf", "1.0.0", make_model(tmp_path / "v1.onnx", scale=1.0))
    return data


def wait_worker_gone(daemon: Daemon) -> None:
    """Until the daemon's worker thread has stopped (it "died" at the point the test chose)."""
    wait_for(lambda: not daemon._threads[0].is_alive(), timeout=20, what="the worker gone")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_kill9_leaves_the_device_offline_through_its_last_will(live_server, tmp_path):
    """SIGKILL leaves the daemon no chance to publish its goodbye presence; the only ``offline``
    the server can get is the will the daemon registered at connect, which the broker publishes
    (retained) when the connection drops."""
    live = live_server
    data = tmp_path / "dev"
    enroll_device(live, data, "edge-will")
    daemon = DaemonProcess(data, tmp_path / "run.log")
    daemon.wait_api()
    try:
        wait_for(lambda: device_record(live, "edge-will")["status"] == "online", what="the device online")
        daemon.kill9()
    finally:
        daemon.terminate()
    assert daemon.proc.returncode == -9
    wait_for(lambda: device_record(live, "edge-will")["status"] == "offline", what="offline through the will")
    assert "device edge-will stopped" not in (tmp_path / "run.log").read_text()  # Daemon.stop never ran


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_kill9_mid_download_resumes_with_range(live_server, tmp_path):
    live = live_server
    data = tmp_path / "dev"
    enroll_device(live, data, "edge-dl")
    # a ~2 MB bundle (a 4 x 100000 weight matrix), downloaded at 300 kB/s: several seconds
    push_model(live, "big", "1.0.0", make_model(tmp_path / "big.onnx", out_dim=100_000))
    first = DaemonProcess(data, tmp_path / "run1.log", download_rate_limit_bps=300_000)
    first.wait_api()
    try:
        seq = assign(live, "edge-dl", "big", "1.0.0", probation=QUICK)["seq"]
        wait_event(live, "edge-dl", lambda e: e["desired_seq"] == seq and e["phase"] == "downloading")
        downloads = data / "downloads"

        def partial_size() -> int:
            return sum(p.stat().st_size for p in downloads.glob("*.partial"))

        wait_for(lambda: partial_size() > 400_000, timeout=20, what="partial download")
        first.kill9()
    finally:
        first.terminate()
    kept = partial_size()
    length = next(i.length for p, i in live.ctx.repo.list_targets().items() if p.startswith("big/"))
    assert 400_000 < kept < length

    second = DaemonProcess(data, tmp_path / "run2.log")
    second.wait_api()
    try:
        out = outcome_for(live, "edge-dl", seq, timeout=30)
        assert out["phase"] == "succeeded", out
        verifying = next(
            e for e in events(live, "edge-dl") if e["desired_seq"] == seq and e["phase"] == "verifying"
        )
        download = verifying["details"]["download"]
        assert download["resumed_from"] >= kept  # buffered bytes may have landed after the size was read
        assert download["http_status"] == 206
        assert download["content_range"] == f"bytes {download['resumed_from']}-{length - 1}/{length}"
        assert (
            f"resuming download of big/1.0.0/default/bundle.tar at byte {download['resumed_from']}"
            in (tmp_path / "run2.log").read_text()
        )
        status, body = infer(second.url, np.ones((1, 4), np.float32))
        assert (status, body["version"]) == (200, "1.0.0")
        assert len(body["outputs"]["y"][0]) == 100_000
        # one report of each phase: the restart did not start the update over
        phases = [e["phase"] for e in events(live, "edge-dl") if e["desired_seq"] == seq]
        assert phases == ["downloading", "verifying", "installing", "probation", "succeeded"]
    finally:
        second.terminate()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_kill9_mid_probation_reverts_to_last_known_good(live_server, tmp_path):
    live = live_server
    data = enrolled_with_v1(live, tmp_path, "edge-pr")
    push_model(live, "clf", "2.0.0", make_model(tmp_path / "v2.onnx", scale=2.0))
    first = DaemonProcess(data, tmp_path / "run1.log")
    first.wait_api()
    try:
        seq1 = assign(live, "edge-pr", "clf", "1.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-pr", seq1)["phase"] == "succeeded"
        seq2 = assign(live, "edge-pr", "clf", "2.0.0", probation={"seconds": 3600})["seq"]
        wait_event(live, "edge-pr", lambda e: e["desired_seq"] == seq2 and e["phase"] == "probation")
        assert serving_version(first.url) == "2.0.0"
        first.kill9()
    finally:
        first.terminate()

    second = DaemonProcess(data, tmp_path / "run2.log")
    second.wait_api()
    try:
        # the API comes up already serving the last known good model
        assert serving_version(second.url) == "1.0.0"
        out = outcome_for(live, "edge-pr", seq2)
        assert out["phase"] == "rolled_back"
        assert out["reason"] == "crashed during probation"
        status, body = infer(second.url, np.ones((1, 4), np.float32))
        assert (status, body["version"]) == (200, "1.0.0")
        # the retained desired state (seq2) is not re-applied after the revert
        second.terminate()
        state = StateStore(data).load().state
        assert (state.update, state.last_desired_seq) == (None, seq2)
        assert state.current["clf"].version == "1.0.0"
        assert state.release_floor["clf"] == 1
        phases = [e["phase"] for e in events(live, "edge-pr") if e["desired_seq"] == seq2]
        assert phases == ["downloading", "verifying", "installing", "probation", "rolled_back"]
    finally:
        second.terminate()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_download_finished_just_before_a_crash_is_not_downloaded_again(live_server, tmp_path, monkeypatch):
    """A kill after the download renamed ``.partial`` to the bundle, before ``downloaded`` was
    committed: the restarted daemon verifies and installs that file instead of downloading again."""
    live = live_server
    data = enrolled_with_v1(live, tmp_path, "edge-fin")
    real = daemon_module.download_resumable
    calls: list[str] = []
    first = Daemon(device_settings(data))

    def download_then_die(url, *args, **kwargs):
        calls.append(url)
        real(url, *args, **kwargs)
        first._stop.set()  # the process "dies" here: the worker commits nothing more
        raise daemon_module._Interrupted("killed")

    monkeypatch.setattr(daemon_module, "download_resumable", download_then_die)
    first.start()
    try:
        seq = assign(live, "edge-fin", "clf", "1.0.0", probation=QUICK)["seq"]
        wait_for(lambda: calls, timeout=20, what="the download")
        wait_worker_gone(first)
    finally:
        first.stop()
    state = StateStore(data).load().state
    assert state.update is not None
    assert state.update.phase is UpdatePhase.downloading
    assert len(list((data / "downloads").glob("*.tar"))) == 1
    assert not list((data / "downloads").glob("*.partial"))

    calls.clear()

    def download(url, *args, **kwargs):
        calls.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(daemon_module, "download_resumable", download)
    second = Daemon(device_settings(data)).start()
    try:
        out = outcome_for(live, "edge-fin", seq)
        assert out["phase"] == "succeeded", out
        assert calls == []
        verifying = next(
            e for e in events(live, "edge-fin") if e["desired_seq"] == seq and e["phase"] == "verifying"
        )
        assert verifying["details"]["download"] == {"complete_before_restart": True}
        assert infer(second.api.url, np.ones((1, 4), np.float32))[1]["version"] == "1.0.0"
    finally:
        second.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_serving_slot_damaged_while_down_falls_back_to_the_previous_model(live_server, tmp_path):
    """The current slot no longer loads at start: the daemon starts, serves the previous model and
    records it as current."""
    data, slot_dir = installed_slot(live_server, tmp_path, "edge-rot", {"1.0.0": 1.0, "2.0.0": 2.0})
    npz = slot_dir / "validation.npz"
    npz.write_bytes(npz.read_bytes()[:100])

    second = Daemon(device_settings(data)).start()
    try:
        assert serving_version(second.api.url) == "1.0.0"
        assert infer(second.api.url, np.ones((1, 4), np.float32))[1]["version"] == "1.0.0"
        state = StateStore(data).load().state
        assert state.current["clf"].version == "1.0.0"
        assert "clf" not in state.previous
    finally:
        second.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_restart_mid_probation_on_a_full_disk_starts_serving_and_reports_later(
    live_server, tmp_path, monkeypatch
):
    """No state can be saved at start-up (full disk): the crash recovery's revert and the report of
    its outcome cannot be persisted, yet the daemon starts and serves the last known good model; the
    worker saves and reports ``rolled_back`` once space is free."""
    live = live_server
    data = enrolled_with_v1(live, tmp_path, "edge-bootfull")
    push_model(live, "clf", "2.0.0", make_model(tmp_path / "v2.onnx", scale=2.0))
    first = Daemon(device_settings(data)).start()
    try:
        seq1 = assign(live, "edge-bootfull", "clf", "1.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-bootfull", seq1)["phase"] == "succeeded"
        seq2 = assign(live, "edge-bootfull", "clf", "2.0.0", probation={"seconds": 3600})["seq"]
        wait_for(lambda: first.state.phase is UpdatePhase.probation, what="v2 on probation")
    finally:
        first.stop()  # the state file stays mid-probation, as after a kill
    full = threading.Event()
    full.set()
    refused: list[str] = []
    real_save = StateStore.save

    def save(self, state):
        if full.is_set():
            refused.append(state.phase.value)
            raise DiskFull("saving state", OSError(errno.ENOSPC, "No space left on device"))
        real_save(self, state)

    monkeypatch.setattr(StateStore, "save", save)
    second = Daemon(device_settings(data)).start()
    try:
        assert refused  # start-up did try to save
        assert serving_version(second.api.url) == "1.0.0"
        assert infer(second.api.url, np.ones((1, 4), np.float32))[1]["version"] == "1.0.0"
        assert StateStore(data).load().state.phase is UpdatePhase.probation  # nothing saved yet
        full.clear()
        out = outcome_for(live, "edge-bootfull", seq2)
        assert (out["phase"], out["reason"]) == ("rolled_back", "crashed during probation"), out
        assert out["details"] == {"recovered": "revert"}
        wait_for(lambda: second.state.update is None, what="the outcome cleared")
        state = StateStore(data).load().state
        assert (state.update, state.current["clf"].version, state.release_floor["clf"]) == (None, "1.0.0", 1)
    finally:
        full.clear()
        second.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_fallback_not_saved_at_start_up_is_saved_by_the_worker(live_server, tmp_path, monkeypatch):
    """The current slot does not load and the fallback to the previous model cannot be saved at
    start-up: the daemon serves the previous model and the worker saves the state once it can."""
    data, slot_dir = installed_slot(live_server, tmp_path, "edge-fbfull", {"1.0.0": 1.0, "2.0.0": 2.0})
    npz = slot_dir / "validation.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    full = threading.Event()
    full.set()
    real_save = StateStore.save

    def save(self, state):
        if full.is_set():
            raise DiskFull("saving state", OSError(errno.ENOSPC, "No space left on device"))
        real_save(self, state)

    monkeypatch.setattr(StateStore, "save", save)
    second = Daemon(device_settings(data)).start()
    try:
        assert serving_version(second.api.url) == "1.0.0"
        assert StateStore(data).load().state.current["clf"].version == "2.0.0"
        full.clear()
        wait_for(
            lambda: StateStore(data).load().state.current["clf"].version == "1.0.0",
            what="the fallback saved",
        )
    finally:
        full.clear()
        second.stop()


def _die_at_journal(daemon: Daemon, marker: bytes, after_write: bool) -> list[int]:
    """The daemon "dies" (its worker stops, committing nothing more) when the report containing
    ``marker`` is journaled: just before the journal write, or just after it."""
    real = daemon.journal.append
    killed: list[int] = []

    def append(seq, topic, payload):
        if marker not in payload:
            return real(seq, topic, payload)
        if after_write:
            real(seq, topic, payload)
        killed.append(seq)
        daemon._stop.set()
        raise RuntimeError("killed")

    daemon.journal.append = append  # type: ignore[method-assign]
    return killed


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("after_write", [False, True], ids=["before_journal", "after_journal"])
def test_kill_around_the_already_serving_report_still_reports_it(live_server, tmp_path, after_write):
    """A re-issue of the serving version is answered ``succeeded`` without an update. A kill around
    that report's journal write must not lose it: its desired seq is persisted only with (after)
    the journaled report, so the restarted daemon re-sends it or handles the retained message again."""
    live = live_server
    data = enrolled_with_v1(live, tmp_path, "edge-again")
    first = Daemon(device_settings(data)).start()
    try:
        seq1 = assign(live, "edge-again", "clf", "1.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-again", seq1)["phase"] == "succeeded"
        wait_for(lambda: first.state.update is None, what="the update cleared")
        killed = _die_at_journal(first, b"already serving", after_write)
        seq2 = assign(live, "edge-again", "clf", "1.0.0", probation=QUICK)["seq"]
        wait_worker_gone(first)
        assert killed
    finally:
        first.stop()

    second = Daemon(device_settings(data)).start()
    try:
        out = outcome_for(live, "edge-again", seq2)
        assert (out["phase"], out["reason"]) == ("succeeded", "already serving this version"), out
        wait_for(lambda: second.state.last_desired_seq == seq2, what="the desired seq persisted")
        assert StateStore(data).load().state.last_desired_seq == seq2
        assert serving_version(second.api.url) == "1.0.0"
    finally:
        second.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_kill_before_a_rejection_is_journaled_still_reports_it(live_server, tmp_path):
    """An authentic desired state the image repository contradicts is rejected once (a redelivery
    of that retained message is then ignored). A kill before the rejection's report is journaled
    must not leave its seq recorded as rejected: the restarted daemon rejects and reports it."""
    from device_client.protocol.signing import sign_envelope
    from tests.helpers.device_fleet import ServerPublisher

    live = live_server
    data = enrolled_with_v1(live, tmp_path, "edge-rej")
    first = Daemon(device_settings(data)).start()
    publisher = ServerPublisher(live)
    try:
        assert first.link is not None
        assert first.link.wait_connected(10)
        killed = _die_at_journal(first, b"target_mismatch", after_write=False)
        seq = 1_000
        bad = desired_for(live, "edge-rej", seq, version="1.0.0", hashes={"sha256": "ab" * 32})
        publisher.publish("edge-rej", sign_envelope(bad, live.ctx.director.key), retain=True)
        wait_worker_gone(first)
        assert killed
    finally:
        first.stop()

    second = Daemon(device_settings(data)).start()
    try:
        out = outcome_for(live, "edge-rej", seq)
        assert out["phase"] == "failed", out
        assert out["details"]["code"] == "target_mismatch", out
        wait_for(lambda: second.state.last_rejected_seq == seq, what="the rejected seq persisted")
    finally:
        publisher.close()
        second.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_reissue_of_a_current_version_that_does_not_load_installs_it(live_server, tmp_path):
    """The only installed slot no longer loads at start-up, so nothing serves although the state
    names it current. A desired state for that version is not answered "already serving": it is
    installed again (downloaded, as the slot is damaged) and serves."""
    live = live_server
    data, slot_dir = installed_slot(live, tmp_path, "edge-none", {"1.0.0": 1.0})
    (slot_dir / "bundle.json").unlink()

    second = Daemon(device_settings(data)).start()
    try:
        assert serving_version(second.api.url) is None
        seq2 = assign(live, "edge-none", "clf", "1.0.0", probation=QUICK)["seq"]
        out = outcome_for(live, "edge-none", seq2)
        assert out["phase"] == "succeeded", out
        assert out["reason"] != "already serving this version", out
        phases = [e["phase"] for e in events(live, "edge-none") if e["desired_seq"] == seq2]
        assert phases == ["downloading", "verifying", "installing", "probation", "succeeded"]
        assert serving_version(second.api.url) == "1.0.0"
        assert infer(second.api.url, np.ones((1, 4), np.float32))[1]["version"] == "1.0.0"
    finally:
        second.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_reissue_of_a_current_version_whose_model_file_is_damaged_repairs_the_slot(live_server, tmp_path):
    """The only installed slot keeps an intact bundle.json but a damaged model.onnx, so it does not
    load at start-up. Assigning that version again must not reuse the damaged slot (neither as an
    installed slot nor as an extraction target whose manifest matches): it is downloaded,
    extracted over the damaged slot and serves."""
    live = live_server
    data, slot_dir = installed_slot(live, tmp_path, "edge-dmg", {"1.0.0": 1.0})
    assert (slot_dir / "bundle.json").exists()
    (slot_dir / "model.onnx").write_bytes(b"not an onnx model")

    second = Daemon(device_settings(data)).start()
    try:
        assert serving_version(second.api.url) is None
        seq2 = assign(live, "edge-dmg", "clf", "1.0.0", probation=QUICK)["seq"]
        out = outcome_for(live, "edge-dmg", seq2)
        assert out["phase"] == "succeeded", out
        phases = [e["phase"] for e in events(live, "edge-dmg") if e["desired_seq"] == seq2]
        assert phases == ["downloading", "verifying", "installing", "probation", "succeeded"]
        assert serving_version(second.api.url) == "1.0.0"
        assert infer(second.api.url, np.ones((1, 4), np.float32))[1]["version"] == "1.0.0"
    finally:
        second.stop()
    third = Daemon(device_settings(data)).start()  # the repaired slot loads after a restart
    try:
        assert serving_version(third.api.url) == "1.0.0"
    finally:
        third.stop()
