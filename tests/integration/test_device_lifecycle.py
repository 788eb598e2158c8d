"""A real device daemon against a real server and a real Mosquitto (mTLS): enroll, install v1,
upgrade to v2, refuse a v3 that fails validation (kept on v2), automatically revert a v3.1 that
passes validation but breaches probation in the field, shadow a candidate."""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest

from device_client.daemon import Daemon
from device_client.protocol.bundle import MODEL_MEMBER
from tests.helpers.bundles import make_bundle
from tests.helpers.device_fleet import (
    assign,
    device_settings,
    enroll_device,
    events,
    infer,
    outcome_for,
    push_model,
    replace_bundle,
    serving_version,
    wait_for,
)
from tests.helpers.onnx_models import make_model, reference_output

pytestmark = pytest.mark.mqtt

QUICK = {"seconds": 0.3, "min_requests": 0}
X = np.random.default_rng(5).random((2, 4), dtype=np.float32)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_install_upgrade_bad_validation_and_probation_revert(live_server, tmp_path):
    live = live_server
    ident = enroll_device(live, tmp_path / "dev", "edge-1")
    assert (tmp_path / "dev" / "device.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "dev").stat().st_mode & 0o777 == 0o700
    assert ident.device_id == "edge-1"
    onnx = tmp_path / "onnx"
    push_model(live, "clf", "1.0.0", make_model(onnx / "v1.onnx", scale=1.0))
    push_model(live, "clf", "2.0.0", make_model(onnx / "v2.onnx", scale=2.0))

    daemon = Daemon(device_settings(tmp_path / "dev")).start()
    try:
        api = daemon.api.url
        assert daemon.link is not None
        assert daemon.link.wait_connected(10)

        # v1: first install
        seq1 = assign(live, "edge-1", "clf", "1.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-1", seq1)["phase"] == "succeeded"
        status, body = infer(api, X)
        assert status == 200
        assert body["version"] == "1.0.0"
        np.testing.assert_allclose(body["outputs"]["y"], reference_output(X, scale=1.0), rtol=1e-5)
        phases = [e["phase"] for e in events(live, "edge-1") if e["desired_seq"] == seq1]
        assert phases == ["downloading", "verifying", "installing", "probation", "succeeded"]

        # v2: upgrade, the hot-swap serves the new outputs
        seq2 = assign(live, "edge-1", "clf", "2.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-1", seq2)["phase"] == "succeeded"
        status, body = infer(api, X)
        assert body["version"] == "2.0.0"
        np.testing.assert_allclose(body["outputs"]["y"], reference_output(X, scale=2.0), rtol=1e-5)
        assert daemon.state.previous["clf"].version == "1.0.0"
        assert daemon.state.release_floor["clf"] == 2

        # v3: a signed, listed bundle whose model does not reproduce its validation vectors
        push_model(live, "clf", "3.0.0", make_model(onnx / "v3.onnx", scale=3.0))
        bad, _ = make_bundle(
            tmp_path / "crafted",
            name="clf",
            version="3.0.0",
            release=3,
            model_file=make_model(tmp_path / "crafted" / MODEL_MEMBER, scale=3.0),
            perturb_validation=0.5,
        )
        replace_bundle(live, "clf", "3.0.0", bad)
        seq3 = assign(live, "edge-1", "clf", "3.0.0", probation=QUICK)["seq"]
        out = outcome_for(live, "edge-1", seq3)
        assert out["phase"] == "failed"
        assert out["reason"].startswith("model_rejected: validation output 'y' differs")
        assert serving_version(api) == "2.0.0"
        assert infer(api, X)[1]["version"] == "2.0.0"

        # v3.1: passes validation (inputs in [0, 1)) but yields NaN on negative inputs in the field
        push_model(live, "clf", "3.1.0", make_model(onnx / "v31.onnx", scale=2.0, nan_on_negative=True))
        probation = {"seconds": 60, "min_requests": 5, "max_error_rate": 0.05}
        seq31 = assign(live, "edge-1", "clf", "3.1.0", probation=probation)["seq"]
        wait_for(lambda: serving_version(api) == "3.1.0", what="v3.1 swapped in")
        negative = -np.ones((1, 4), np.float32)
        sent = 0

        def reverted() -> bool:
            nonlocal sent
            if serving_version(api) == "2.0.0":
                return True
            infer(api, negative)
            sent += 1
            return False

        wait_for(reverted, timeout=20, what="automatic revert")
        out = outcome_for(live, "edge-1", seq31)
        assert out["phase"] == "rolled_back"
        assert out["reason"].startswith("probation_failed:")
        assert "errors" in out["reason"]
        numbers = out["details"]["probation"]
        assert numbers["errors"] >= 2
        assert numbers["requests"] == numbers["errors"]
        status, body = infer(api, X)
        assert (status, body["version"]) == (200, "2.0.0")
        assert daemon.state.current["clf"].version == "2.0.0"
        assert daemon.state.previous["clf"].version == "1.0.0"
        assert daemon.state.release_floor["clf"] == 2
    finally:
        daemon.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_shadow_candidate_never_answers_and_publishes_shadow_windows(live_server, tmp_path):
    import sqlalchemy as sa

    from server.health.tables import HealthSample

    live = live_server
    enroll_device(live, tmp_path / "dev", "edge-sh")
    onnx = tmp_path / "onnx"
    push_model(live, "clf", "1.0.0", make_model(onnx / "v1.onnx"))
    push_model(live, "clf", "1.1.0", make_model(onnx / "v11.onnx", slow_factor=2))  # same answers
    daemon = Daemon(device_settings(tmp_path / "dev", shadow_sample_rate=1.0)).start()
    try:
        api = daemon.api.url
        seq1 = assign(live, "edge-sh", "clf", "1.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-sh", seq1)["phase"] == "succeeded"
        probation = {"seconds": 0.5, "min_requests": 5}
        seq2 = assign(live, "edge-sh", "clf", "1.1.0", mode="shadow", probation=probation)["seq"]
        wait_for(lambda: daemon.api.health()["models"]["clf"]["shadow"] == "1.1.0", what="shadow loaded")

        def shadowed_enough() -> bool:
            status, body = infer(api, X)
            assert (status, body["version"]) == (200, "1.0.0")  # the candidate never answers
            return daemon.state.update is None

        wait_for(shadowed_enough, what="shadow probation over")
        out = outcome_for(live, "edge-sh", seq2)
        assert out["phase"] == "succeeded", out
        assert out["details"]["probation"]["agreement"] == 1.0
        assert daemon.state.shadow["clf"].version == "1.1.0"
        assert daemon.state.current["clf"].version == "1.0.0"

        def shadow_windows() -> list:
            with live.ctx.db.session_scope() as s:
                return list(
                    s.execute(
                        sa.select(HealthSample.version, HealthSample.requests, HealthSample.agreement)
                        .where(HealthSample.device_id == "edge-sh", HealthSample.mode == "shadow")
                        .where(HealthSample.requests > 0)
                    )
                )

        rows = wait_for(shadow_windows, what="shadow health windows")
        assert all(v == "1.1.0" and a == 1.0 for v, _, a in rows)

        # the next desired state (serve the candidate) ends the shadow and swaps it in
        seq3 = assign(live, "edge-sh", "clf", "1.1.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-sh", seq3)["phase"] == "succeeded"
        assert infer(api, X)[1]["version"] == "1.1.0"
        assert daemon.api.health()["models"]["clf"]["shadow"] is None
        assert daemon.state.shadow == {}
    finally:
        daemon.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_desired_state_queued_while_installing_is_handled_after_the_install(live_server, tmp_path):
    """A DesiredState that arrives during verification is still queued when the update enters
    ``installing`` (which cannot be cancelled): it waits for the install, then supersedes it."""
    import threading

    live = live_server
    enroll_device(live, tmp_path / "dev", "edge-q")
    onnx = tmp_path / "onnx"
    push_model(live, "clf", "1.0.0", make_model(onnx / "v1.onnx", scale=1.0))
    push_model(live, "clf", "2.0.0", make_model(onnx / "v2.onnx", scale=2.0))
    daemon = Daemon(device_settings(tmp_path / "dev"))
    extracting, release = threading.Event(), threading.Event()
    install_bundle = daemon.store.install_bundle

    def slow_install(*args, **kwargs):
        extracting.set()
        release.wait(20)
        return install_bundle(*args, **kwargs)

    daemon.store.install_bundle = slow_install  # type: ignore[method-assign]
    daemon.start()
    try:
        seq1 = assign(live, "edge-q", "clf", "1.0.0", probation={"seconds": 3600})["seq"]
        assert extracting.wait(20)
        seq2 = assign(live, "edge-q", "clf", "2.0.0", probation=QUICK)["seq"]
        wait_for(lambda: daemon.intake.inbox.qsize() > 0, what="the newer desired state queued")
        daemon.store.install_bundle = install_bundle  # type: ignore[method-assign]
        release.set()
        out2 = outcome_for(live, "edge-q", seq2, timeout=20)
        assert out2["phase"] == "succeeded", out2
        out1 = outcome_for(live, "edge-q", seq1)
        assert out1["phase"] == "cancelled", out1
        phases = [e["phase"] for e in events(live, "edge-q") if e["desired_seq"] == seq1]
        assert phases == ["downloading", "verifying", "installing", "probation", "cancelled"]
        assert infer(daemon.api.url, X)[1]["version"] == "2.0.0"
        assert daemon.state.last_desired_seq == seq2
    finally:
        release.set()
        daemon.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_unexpected_error_while_verifying_fails_the_update(live_server, tmp_path, monkeypatch):
    """An error the steps do not expect (EIO reading the bundle) fails the update with a report
    instead of retrying it every second forever; the current model keeps serving."""
    import errno

    from device_client.daemon import updater as daemon_module

    live = live_server
    enroll_device(live, tmp_path / "dev", "edge-eio")
    onnx = tmp_path / "onnx"
    push_model(live, "clf", "1.0.0", make_model(onnx / "v1.onnx", scale=1.0))
    push_model(live, "clf", "2.0.0", make_model(onnx / "v2.onnx", scale=2.0))
    daemon = Daemon(device_settings(tmp_path / "dev")).start()
    try:
        seq1 = assign(live, "edge-eio", "clf", "1.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-eio", seq1)["phase"] == "succeeded"

        def eio(path):
            raise OSError(errno.EIO, "Input/output error", str(path))

        monkeypatch.setattr(daemon_module, "file_sha256", eio)
        seq2 = assign(live, "edge-eio", "clf", "2.0.0", probation=QUICK)["seq"]
        out = outcome_for(live, "edge-eio", seq2, timeout=15)
        assert out["phase"] == "failed", out
        assert out["reason"].startswith("internal_error: OSError: [Errno 5] Input/output error"), out
        assert infer(daemon.api.url, X)[1]["version"] == "1.0.0"
        assert serving_version(daemon.api.url) == "1.0.0"
        wait_for(lambda: daemon.state.update is None, what="the update cleared")
    finally:
        daemon.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cold_previous_that_no_longer_loads_serves_nothing_after_a_probation_breach(live_server, tmp_path):
    """Probation fails, the previous model is cold and its slot went bad: the rollback cannot load
    it, so the breaching model stops serving and ``rolled_back`` is reported with why."""
    live = live_server
    data = tmp_path / "dev"
    enroll_device(live, data, "edge-cold")
    onnx = tmp_path / "onnx"
    push_model(live, "clf", "1.0.0", make_model(onnx / "v1.onnx", scale=1.0))
    push_model(live, "clf", "2.0.0", make_model(onnx / "v2.onnx", scale=2.0, nan_on_negative=True))
    daemon = Daemon(device_settings(data, keep_previous_warm=False)).start()
    try:
        api = daemon.api.url
        seq1 = assign(live, "edge-cold", "clf", "1.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-cold", seq1)["phase"] == "succeeded"
        probation = {"seconds": 60, "min_requests": 3, "max_error_rate": 0.05}
        seq2 = assign(live, "edge-cold", "clf", "2.0.0", probation=probation)["seq"]
        wait_for(lambda: serving_version(api) == "2.0.0", what="v2 swapped in")
        npz = data / daemon.state.previous["clf"].path / "validation.npz"
        npz.write_bytes(npz.read_bytes()[:100])  # the cold previous no longer loads
        for _ in range(5):
            infer(api, -np.ones((1, 4), np.float32))
        out = outcome_for(live, "edge-cold", seq2, timeout=15)
        assert out["phase"] == "rolled_back", out
        assert out["reason"].startswith("probation_failed:")
        assert out["details"]["rollback_error"].startswith("the previous model does not load: unreadable")
        assert serving_version(api) is None
        assert infer(api, X)[0] != 200
        assert daemon.state.current["clf"].version == "1.0.0"
    finally:
        daemon.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_probation_breach_on_a_full_disk_reverts_once_the_state_can_be_saved(
    live_server, tmp_path, monkeypatch
):
    """v2 (answering NaN) breaches its probation while no state can be saved: the host flips back
    to v1 at once, so v1 answers callers while the disk is still full; only the save of
    ``rolled_back`` is retried (never the flip) until it succeeds, and it never turns into a pass
    of v2 measured on the healthy v1. On disk v2 stays current under probation meanwhile (a crash
    then is recovered by reverting)."""
    from device_client.state import UpdatePhase
    from device_client.store import DiskFull, StateStore

    live = live_server
    data = tmp_path / "dev"
    enroll_device(live, data, "edge-fullrev")
    onnx = tmp_path / "onnx"
    push_model(live, "clf", "1.0.0", make_model(onnx / "v1.onnx", scale=1.0))
    push_model(live, "clf", "2.0.0", make_model(onnx / "v2.onnx", scale=2.0, nan_on_negative=True))
    daemon = Daemon(device_settings(data)).start()
    full = threading.Event()
    refused: list[str] = []
    real_save = daemon.store.save

    def save(state):
        if full.is_set():
            refused.append(state.phase.value)
            raise DiskFull("saving state", OSError(errno.ENOSPC, "No space left on device"))
        real_save(state)

    monkeypatch.setattr(daemon.store, "save", save)
    try:
        api = daemon.api.url
        seq1 = assign(live, "edge-fullrev", "clf", "1.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-fullrev", seq1)["phase"] == "succeeded"
        probation = {"seconds": 1, "min_requests": 3, "max_error_rate": 0.05}
        seq2 = assign(live, "edge-fullrev", "clf", "2.0.0", probation=probation)["seq"]
        wait_for(lambda: daemon.state.phase is UpdatePhase.probation, what="v2 on probation")
        full.set()
        for _ in range(5):
            infer(api, -np.ones((1, 4), np.float32))  # NaN outputs: a breach
        wait_for(lambda: refused.count("rolled_back") >= 2, timeout=15, what="the revert retried")
        assert serving_version(api) == "1.0.0"  # the disk is still full: v1 serves already
        assert infer(api, -np.ones((1, 4), np.float32))[1]["version"] == "1.0.0"
        for _ in range(5):
            infer(api, X)  # healthy answers from v1 must not pass v2
        time.sleep(1.5)
        assert serving_version(api) == "1.0.0"
        assert daemon.state.phase is UpdatePhase.probation
        on_disk = StateStore(data).load().state
        assert on_disk.current["clf"].version == "2.0.0"
        assert on_disk.phase is UpdatePhase.probation
        outcomes = ("succeeded", "rolled_back", "failed")
        seen = [e["phase"] for e in events(live, "edge-fullrev") if e["desired_seq"] == seq2]
        assert not set(seen) & set(outcomes), seen

        full.clear()
        out = outcome_for(live, "edge-fullrev", seq2, timeout=15)
        assert out["phase"] == "rolled_back", out
        assert out["reason"].startswith("probation_failed:"), out
        assert out["details"]["probation"]["errors"] >= 1  # the breach's numbers survived the retries
        assert serving_version(api) == "1.0.0"
        assert infer(api, X)[1]["version"] == "1.0.0"
        wait_for(lambda: daemon.state.update is None, what="the outcome cleared")
        on_disk = StateStore(data).load().state
        assert on_disk.current["clf"].version == "1.0.0"
        assert on_disk.release_floor["clf"] == 1
    finally:
        full.clear()
        daemon.stop()
