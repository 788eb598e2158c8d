"""Every bad input a device can receive, against a real daemon, server and Mosquitto: each is reported with a
clear reason and the device keeps serving its current model (checked through its local API).

Routes used to produce the bad inputs:

* desired-state messages are injected on the device's ``desired`` topic with the server's own MQTT
  identity (``broker_dir/fleet_server.*``, the only identity the ACL lets publish there); forged
  ones are signed with a throwaway key, the "stolen director key" ones with the real director key;
* tampered and truncated bundles: the stored target file on the server is modified after it was
  published (the signed metadata still names the original length and hash);
* unsafe bundles (path traversal, symlink, a model onnxruntime cannot load, outputs that do not
  match their validation vectors) cannot be pushed through the registry, so they are re-published
  over a pushed version with the repository's targets key (``replace_bundle``): the device gets a
  correctly signed and listed bundle that is bad inside;
* oversized: the device's ``max_bundle_bytes`` cap below the bundle's length; full disk: a
  ``min_free_bytes`` reserve larger than the file system's free space, so the pre-flight space check
  fails exactly as it does on a full disk (a real ENOSPC needs root to set up a tiny file system).
"""

from __future__ import annotations

import io
import json
import tarfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_client.daemon import Daemon
from device_client.protocol.bundle import MODEL_MEMBER
from device_client.protocol.messages import utcnow
from device_client.protocol.signing import sign_envelope
from tests.helpers.bundles import make_bundle
from tests.helpers.device_fleet import (
    ServerPublisher,
    assign,
    desired_for,
    device_settings,
    enroll_device,
    events,
    infer,
    outcome_for,
    push_model,
    replace_bundle,
    serving_version,
    target_file,
    wait_event,
)
from tests.helpers.onnx_models import make_model

pytestmark = pytest.mark.mqtt

QUICK = {"seconds": 0.2, "min_requests": 0}
X = np.random.default_rng(3).random((1, 4), dtype=np.float32)


def _rejection(live, device_id: str, code: str) -> dict:
    return wait_event(
        live, device_id, lambda e: e["phase"] == "failed" and (e["reason"] or "").startswith(f"{code}:")
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_desired_states_are_reported_and_change_nothing(live_server, tmp_path):
    live = live_server
    enroll_device(live, tmp_path / "dev", "edge-2")
    onnx = tmp_path / "onnx"
    for i, version in enumerate(("1.0.0", "2.0.0", "3.0.0"), start=1):
        push_model(live, "clf", version, make_model(onnx / f"v{i}.onnx", scale=float(i)))
    daemon = Daemon(device_settings(tmp_path / "dev")).start()
    publisher = ServerPublisher(live)
    try:
        api = daemon.api.url
        for version in ("1.0.0", "2.0.0"):
            seq = assign(live, "edge-2", "clf", version, probation=QUICK)["seq"]
            assert outcome_for(live, "edge-2", seq)["phase"] == "succeeded"
        director = live.ctx.director.key
        rogue = Ed25519PrivateKey.generate()
        last = daemon.state.last_desired_seq

        cases = [
            ("malformed", b'{"signed": {"seq": 99'),
            ("malformed", json.dumps({"hello": "world"}).encode()),
            ("unsigned", {"signed": desired_for(live, "edge-2", last + 10), "signatures": []}),
            ("bad_signature", sign_envelope(desired_for(live, "edge-2", last + 11), rogue)),
            ("wrong_device", sign_envelope(desired_for(live, "other-device", last + 12), director)),
            ("replayed", sign_envelope(desired_for(live, "edge-2", last - 1), director)),
            (
                "expired",
                sign_envelope(
                    desired_for(
                        live,
                        "edge-2",
                        last + 13,
                        issued_at=utcnow() - timedelta(hours=2),
                        expires_at=utcnow() - timedelta(hours=1),
                    ),
                    director,
                ),
            ),
            # a stolen director key cannot install what the image repository does not list
            (
                "target_not_listed",
                sign_envelope(
                    desired_for(live, "edge-2", last + 14, target="clf/3.0.0/default/evil.tar"), director
                ),
            ),
            (
                "target_mismatch",
                sign_envelope(desired_for(live, "edge-2", last + 15, hashes={"sha256": "ab" * 32}), director),
            ),
        ]
        for code, payload in cases:
            publisher.publish("edge-2", payload)
            event = _rejection(live, "edge-2", code)
            authentic = code in ("target_not_listed", "target_mismatch")
            assert (event["desired_seq"] is not None) == authentic, event
            assert event["details"]["code"] == code
            assert serving_version(api) == "2.0.0"
            assert infer(api, X)[1]["version"] == "2.0.0"
        assert daemon.state.current["clf"].version == "2.0.0"
        assert daemon.state.update is None
        # both malformed messages were reported, each once
        assert sum(1 for e in events(live, "edge-2") if (e["reason"] or "").startswith("malformed:")) == 2

        # release floor: after v3 the server asks for v1, which is neither >= the floor nor the
        # version this device ran just before; v2 (the previous version) is an allowed rollback
        seq3 = assign(live, "edge-2", "clf", "3.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-2", seq3)["phase"] == "succeeded"
        seq_v1 = assign(live, "edge-2", "clf", "1.0.0", probation=QUICK)["seq"]
        out = outcome_for(live, "edge-2", seq_v1)
        assert out["phase"] == "failed"
        assert out["reason"].startswith("release_floor:")
        assert serving_version(api) == "3.0.0"
        seq_v2 = assign(live, "edge-2", "clf", "2.0.0", probation=QUICK)["seq"]
        out = outcome_for(live, "edge-2", seq_v2)
        assert out["phase"] == "succeeded"
        reused = [
            e for e in events(live, "edge-2") if e["desired_seq"] == seq_v2 and e["phase"] == "verifying"
        ]
        assert reused[0]["details"] == {"reused_slot": True}  # the rollback needed no download
        assert serving_version(api) == "2.0.0"
    finally:
        publisher.close()
        daemon.stop()


def _retar(good: Path, dest: Path, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    """Copy a bundle tar and append one more member."""
    with tarfile.open(good) as src, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as out:
        for m in src.getmembers():
            out.addfile(m, src.extractfile(m))
        out.addfile(extra, io.BytesIO(data) if data else None)
    return dest


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_bundles_are_reported_and_change_nothing(live_server, tmp_path):
    live = live_server
    enroll_device(live, tmp_path / "dev", "edge-3")
    onnx = tmp_path / "onnx"
    crafted = tmp_path / "crafted"
    push_model(live, "clf", "1.0.0", make_model(onnx / "v1.onnx"))
    versions = ["2.0.0", "2.1.0", "2.2.0", "2.3.0", "2.4.0"]
    for i, version in enumerate(versions):
        push_model(live, "clf", version, make_model(onnx / f"{version}.onnx", scale=2.0 + i))

    def good_bundle(version: str, release: int, **kw) -> Path:
        tar, _ = make_bundle(crafted / version, name="clf", version=version, release=release, **kw)
        return tar

    # 2.2.0: path traversal; 2.3.0: a symlink; 2.4.0: a model onnxruntime cannot load
    traversal = tarfile.TarInfo("../evil")
    traversal.size = 4
    replace_bundle(
        live, "clf", "2.2.0", _retar(good_bundle("2.2.0", 4), crafted / "trav.tar", traversal, b"evil")
    )
    link = tarfile.TarInfo("model.link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    replace_bundle(live, "clf", "2.3.0", _retar(good_bundle("2.3.0", 5), crafted / "link.tar", link))
    garbage = crafted / "garbage" / MODEL_MEMBER
    garbage.parent.mkdir(parents=True)
    make_model(garbage)
    garbage.write_bytes(garbage.read_bytes()[:200])
    broken = crafted / "broken"
    broken.mkdir()
    replace_bundle(live, "clf", "2.4.0", _bundle_with_model(broken, garbage, "2.4.0", 6))
    # 2.0.0: tampered after signing; 2.1.0: truncated after signing
    stored = target_file(live, "clf", "2.0.0")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    stored = target_file(live, "clf", "2.1.0")
    stored.write_bytes(stored.read_bytes()[:1000])

    settings = device_settings(tmp_path / "dev")
    daemon = Daemon(settings).start()
    try:
        api = daemon.api.url
        seq = assign(live, "edge-3", "clf", "1.0.0", probation=QUICK)["seq"]
        assert outcome_for(live, "edge-3", seq)["phase"] == "succeeded"
        expected = {
            "2.0.0": "download_failed: ",  # tampered: sha256 differs
            "2.1.0": "download_failed: ",  # truncated: the server has fewer bytes
            "2.2.0": "bad_bundle: unsafe member path '../evil'",
            "2.3.0": "bad_bundle: bundle contains a link",
            "2.4.0": "model_rejected: onnxruntime cannot load the model",
        }
        detail = {"2.0.0": "sha256", "2.1.0": "expected"}
        for version, prefix in expected.items():
            seq = assign(live, "edge-3", "clf", version, probation=QUICK)["seq"]
            out = outcome_for(live, "edge-3", seq)
            assert out["phase"] == "failed", out
            assert out["reason"].startswith(prefix), out["reason"]
            assert detail.get(version, "") in out["reason"]
            assert infer(api, X)[1]["version"] == "1.0.0"
        assert not any((tmp_path / "dev" / "downloads").iterdir())
        assert not (tmp_path / "dev" / "evil").exists()
        assert not (tmp_path / "dev" / "models" / "evil").exists()
    finally:
        daemon.stop()

    # oversized: the same device with a 10 kB cap; full disk: a reserve no file system has free
    for overrides, prefix, version in (
        ({"max_bundle_bytes": 10_000}, "download_failed: ", "9.0.0"),
        ({"min_free_bytes": 10**18}, "disk_full: ", "9.1.0"),
    ):
        daemon = Daemon(settings.model_copy(update=overrides)).start()
        try:
            push_model(live, "clf", version, make_model(onnx / f"{version}.onnx", scale=7.0))
            seq = assign(live, "edge-3", "clf", version, probation=QUICK)["seq"]
            out = outcome_for(live, "edge-3", seq)
            assert out["phase"] == "failed"
            assert out["reason"].startswith(prefix), out["reason"]
            if prefix == "download_failed: ":
                assert "exceeds the cap of 10000" in out["reason"]
            assert infer(daemon.api.url, X)[1]["version"] == "1.0.0"
        finally:
            daemon.stop()


def _bundle_with_model(workdir: Path, model_file: Path, version: str, release: int) -> Path:
    """A well-formed bundle around a model file that is not a loadable ONNX model."""
    from device_client.protocol.bundle import VALIDATION_MEMBER, build_bundle

    x = np.zeros((1, 4), np.float32)
    npz = workdir / VALIDATION_MEMBER
    np.savez(npz, **{"inputs/x": x, "outputs/y": np.zeros((1, 3), np.float32)})
    dest = workdir / "bundle.tar"
    build_bundle(
        dest,
        {
            "name": "clf",
            "version": version,
            "release": release,
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 3]}],
        },
        {MODEL_MEMBER: model_file, VALIDATION_MEMBER: npz},
    )
    return dest
