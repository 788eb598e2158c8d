"""How the cloud tier follows the image repository: only verified bundles, pinned versions, revoked
versions dropped, a repository that cannot be read, a trust anchor that does not fit."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from server.cloud.serve import CloudThread
from server.cloud.service import CloudConfigError, CloudService
from tests.helpers.cloud import infer_body, metric, reference, start_fleet, wait_for
from tests.helpers.onnx_models import make_model

X = np.random.default_rng(11).random((1, 4), dtype=np.float32)


@pytest.fixture
def fleet(settings, tmp_path):
    f = start_fleet(settings)
    f.push("clf", "1.0.0", make_model(tmp_path / "m1.onnx", seed=1))
    f.push("clf", "1.1.0", make_model(tmp_path / "m2.onnx", seed=2))
    yield f
    f.close()


def _versions(cloud, device):
    r = httpx.get(f"{cloud.url}/v2/models/clf", headers=device.headers())
    return r.json()["versions"] if r.status_code == 200 else r.status_code


def _refreshes(cloud, result: str) -> float:
    text = httpx.get(f"{cloud.url}/metrics").text
    return metric(text, "fleet_cloud_repository_refresh_total", result=result) or 0


def _answer(cloud, device, path="/v2/models/clf/infer"):
    r = httpx.post(cloud.url + path, json=infer_body(X), headers=device.headers())
    assert r.status_code == 200, r.text
    return r.json()["model_version"], np.array(r.json()["outputs"][0]["data"], np.float32).reshape(1, 3)


def test_a_bundle_that_fails_verification_is_never_served(fleet):
    """1.1.0's bundle is altered on the server's disk: its hash no longer matches the signed target,
    so the tier keeps serving 1.0.0 until the right bytes are back."""
    device = fleet.enroll("dev-1")
    path = fleet.ctx.repo.target_file("clf/1.1.0/default/bundle.tar")
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with CloudThread(fleet.cloud_settings("clf,clf@1.0.0")) as cloud:
        cloud.wait_ready()
        wait_for(lambda: _refreshes(cloud, "install_failed") >= 2, what="failed installs")
        assert _versions(cloud, device) == ["1.0.0"]
        version, out = _answer(cloud, device)
        assert version == "1.0.0"
        np.testing.assert_array_equal(out, reference(fleet.models[("clf", "1.0.0")], X))
        path.write_bytes(good)
        wait_for(lambda: _versions(cloud, device) == ["1.1.0", "1.0.0"], what="1.1.0 installed")
        version, out = _answer(cloud, device)
        assert version == "1.1.0"
        np.testing.assert_array_equal(out, reference(fleet.models[("clf", "1.1.0")], X))


def test_revoked_pinned_version_is_dropped_and_the_default_stays(fleet):
    device = fleet.enroll("dev-1")
    with CloudThread(fleet.cloud_settings("clf,clf@1.0.0")) as cloud:
        cloud.wait_ready()
        assert _versions(cloud, device) == ["1.1.0", "1.0.0"]
        assert _answer(cloud, device, "/v2/models/clf/versions/1.0.0/infer")[0] == "1.0.0"
        fleet.revoke("clf", "1.0.0")
        wait_for(lambda: _versions(cloud, device) == ["1.1.0"], what="1.0.0 dropped")
        r = httpx.post(
            f"{cloud.url}/v2/models/clf/versions/1.0.0/infer", json=infer_body(X), headers=device.headers()
        )
        assert r.status_code == 404
        assert _answer(cloud, device)[0] == "1.1.0"


def test_revoking_every_version_takes_the_model_away(fleet):
    device = fleet.enroll("dev-1")
    settings = fleet.cloud_settings("clf")
    stale = settings.cloud_dir / "downloads" / "clf-0.9.0-default-0123456789abcdef.tar.partial"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"a download of a version no longer listed")
    with CloudThread(settings) as cloud:
        cloud.wait_ready()
        wait_for(lambda: not stale.exists(), what="the stale partial download deleted")
        fleet.revoke("clf", "1.1.0")
        wait_for(lambda: _versions(cloud, device) == ["1.0.0"], what="back to 1.0.0")
        fleet.revoke("clf", "1.0.0")
        wait_for(lambda: _versions(cloud, device) == 404, what="clf gone")
        assert httpx.get(f"{cloud.url}/v2/health/ready").status_code == 503
        slots = cloud.settings.cloud_dir / "models"
        wait_for(lambda: not any(slots.iterdir()), what="the slots deleted")


def test_installed_bundles_serve_when_the_repository_is_down_at_start(fleet):
    device = fleet.enroll("dev-1")
    settings = fleet.cloud_settings("clf")
    with CloudThread(settings) as cloud:
        cloud.wait_ready()
    fleet.server.stop()
    again = fleet.cloud_settings("clf", cloud_data_dir=settings.cloud_dir)  # what the first one installed
    with CloudThread(again) as cloud:
        cloud.wait_ready()
        version, out = _answer(cloud, device)
        assert version == "1.1.0"
        np.testing.assert_array_equal(out, reference(fleet.models[("clf", "1.1.0")], X))
        assert _refreshes(cloud, "unreachable") >= 1


def test_a_root_of_another_repository_installs_nothing(fleet, settings, tmp_path):
    from server.trust.repository import ImageRepository

    other = ImageRepository(tmp_path / "other-repo", tmp_path / "other-keys")
    other.initialize()
    foreign_root = tmp_path / "foreign-root.json"
    foreign_root.write_text(json.dumps(other.trusted_root()))
    with CloudThread(fleet.cloud_settings("clf", cloud_tuf_root=foreign_root)) as cloud:
        wait_for(lambda: _refreshes(cloud, "refused") >= 1, what="a refused refresh")
        assert cloud.service.registry.loaded() == {}
        assert httpx.get(f"{cloud.url}/v2/health/ready").status_code == 503


def test_without_a_trust_anchor_it_does_not_start(fleet, tmp_path):
    settings = fleet.cloud_settings("clf", repo_dir=tmp_path / "nowhere")
    with pytest.raises(CloudConfigError, match="FLEET_CLOUD_TUF_ROOT"):
        CloudService(settings)


def test_without_a_token_for_the_server_it_does_not_start(fleet):
    with pytest.raises(CloudConfigError, match="fleet admin token create --role cloud"):
        CloudService(fleet.cloud_settings("clf", cloud_token=None))


def test_a_download_gives_up_when_the_tier_stops(fleet):
    service = CloudService(fleet.cloud_settings("clf"))
    try:
        service.sync.stop.set()
        assert service.sync.refresh()  # the repository was read...
        assert service.registry.loaded() == {}  # ...but nothing was installed
        counters = service.metrics.counters
        assert counters.get("fleet_cloud_repository_refresh_total", result="install_failed") == 1
        assert not list((service.settings.cloud_dir / "models").iterdir())
    finally:
        service.stop()


def test_an_invalid_variant_is_refused(fleet):
    with pytest.raises(CloudConfigError, match="FLEET_CLOUD_VARIANT"):
        CloudService(fleet.cloud_settings("clf", cloud_variant="../x"))


def test_tls_files_that_are_not_there_are_refused(fleet, tmp_path):
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    cert.write_text("x")
    with pytest.raises(CloudConfigError, match="FLEET_CLOUD_TLS_KEY"):
        CloudService(fleet.cloud_settings("clf", cloud_tls_cert=cert, cloud_tls_key=key))
    key.write_text("x")
    with pytest.raises(CloudConfigError, match="FLEET_CLOUD_CLIENT_CA"):
        CloudService(
            fleet.cloud_settings("clf", cloud_tls_cert=cert, cloud_tls_key=key, key_dir=tmp_path / "none")
        )
