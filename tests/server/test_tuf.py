"""The TUF repository over HTTP: metadata, authorised and resumable target downloads, and a real
``tuf.ngclient.Updater`` that refreshes, downloads, and rejects a tampered bundle."""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc

from server.db import utcnow
from tests.helpers.catalog import auth, push
from tests.helpers.tuf_client import enroll_device, target_url, updater

BASE = "http://testserver"


@pytest.fixture
def device(app_client, admin_headers) -> dict:
    return enroll_device(app_client, admin_headers, "cam-001")


@pytest.fixture
def published(app_client, admin_headers, onnx_model, ctx) -> dict:
    """Two published versions of ``resnet``; returns {version: artifact}."""
    out = {}
    for version, seed in (("1.0.0", 1), ("1.1.0", 2)):
        r = push(app_client, admin_headers, "resnet", version, onnx_model(f"{version}.onnx", seed=seed))
        assert r.status_code == 201, r.text
        out[version] = r.json()["variants"][0]
    return out


# -- metadata ---------------------------------------------------------------------------------
def test_metadata_is_public_and_names_are_strict(app_client, ctx, published):
    r = app_client.get("/tuf/metadata/timestamp.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.content == (ctx.repo.metadata_dir / "timestamp.json").read_bytes()
    assert json.loads(r.content)["signed"]["version"] == 3
    for name in ("1.root.json", "root.json", "3.targets.json", "3.snapshot.json", "1.targets.json"):
        assert app_client.get(f"/tuf/metadata/{name}").status_code == 200, name
    for name in (
        "2.root.json",  # the next root does not exist yet: ngclient relies on this 404
        "4.targets.json",
        "0.root.json",
        "timestamp.json.tmp",
        ".lock",
        "..%2Fkeys%2Ftuf-root.key",
        "%2e%2e",
        "targets.json",
        "01.root.json",
    ):
        r = app_client.get(f"/tuf/metadata/{name}")
        assert r.status_code == 404, name  # from the handler, or no route matched at all
        assert b"PRIVATE KEY" not in r.content
    assert app_client.get("/tuf/metadata/../../api/v1/models").status_code in (401, 404)


# -- targets: authorisation -----------------------------------------------------------------------
def test_target_download_needs_a_device_or_admin_token(
    app_client, admin_headers, make_token, device, published, ctx
):
    url = target_url(published["1.0.0"])
    full = ctx.repo.target_file("resnet/1.0.0/default/bundle.tar").read_bytes()
    assert app_client.get(url).status_code == 401
    assert app_client.get(url, headers=auth("fd.cam-001.AAAAAAAAAAAAAAAAAAAAAAAAAAAA")).status_code == 401
    assert app_client.get(url, headers=auth("something-else")).status_code == 401
    assert app_client.get(url, headers={"Authorization": "Basic Zm9vOmJhcg=="}).status_code == 401

    r = app_client.get(url, headers=auth(device["device_token"]))
    assert r.status_code == 200
    assert r.content == full
    assert r.headers["accept-ranges"] == "bytes"
    assert int(r.headers["content-length"]) == len(full)
    assert hashlib.sha256(r.content).hexdigest() == published["1.0.0"]["sha256"]
    assert app_client.get(url, headers=auth(make_token("viewer"))).content == full

    r = app_client.post("/api/v1/devices/cam-001/decommission", headers=admin_headers)
    assert r.status_code == 200, r.text
    assert app_client.get(url, headers=auth(device["device_token"])).status_code == 403


def test_the_cloud_role_downloads_targets_and_reads_nothing_else(app_client, make_token, published, ctx):
    """`fleet cloud serve`'s identity (an admin token of role ``cloud``): bundles, nothing more."""
    token = auth(make_token("cloud"))
    url = target_url(published["1.0.0"])
    full = ctx.repo.target_file("resnet/1.0.0/default/bundle.tar").read_bytes()
    assert app_client.get(url, headers=token).content == full
    for path in ("devices", "models", "rollouts", "audit", "admin/tokens"):
        r = app_client.get(f"/api/v1/{path}", headers=token)
        assert r.status_code == 403, path
        assert "'cloud'" in r.json()["detail"]


def test_target_paths_are_traversal_safe(app_client, device, published, ctx, tmp_path):
    headers = auth(device["device_token"])
    secret = ctx.settings.key_dir / "tuf-root.key"
    assert secret.exists()
    link_dir = ctx.repo.targets_dir / "evil"
    link_dir.mkdir()
    os.symlink(secret, link_dir / "key.pem")
    os.symlink(ctx.settings.key_dir, ctx.repo.targets_dir / "keys")
    for path in (
        "../keys/tuf-root.key",
        "..%2F..%2Fkeys%2Ftuf-root.key",
        "%2e%2e/%2e%2e/keys/tuf-root.key",
        "evil/key.pem",
        "keys/tuf-root.key",
        "resnet/1.0.0/default",
        "resnet/1.0.0/default/",
        "resnet/1.0.0/default/bundle.tar",  # the unprefixed name is not stored
        "/etc/passwd",
        "",
    ):
        r = app_client.get(f"/tuf/targets/{path}", headers=headers)
        assert r.status_code == 404, (path, r.status_code)
        assert b"PRIVATE KEY" not in r.content


# -- targets: ranges ----------------------------------------------------------------------------
def test_range_requests_and_resume(app_client, device, published, ctx):
    url = target_url(published["1.1.0"])
    headers = auth(device["device_token"])
    full = ctx.repo.target_file("resnet/1.1.0/default/bundle.tar").read_bytes()
    size = len(full)

    r = app_client.get(url, headers={**headers, "Range": "bytes=100-"})
    assert r.status_code == 206
    assert r.content == full[100:]
    assert r.headers["content-range"] == f"bytes 100-{size - 1}/{size}"
    assert int(r.headers["content-length"]) == size - 100

    r = app_client.get(url, headers={**headers, "Range": "bytes=10-19"})
    assert (r.status_code, r.content, r.headers["content-range"]) == (206, full[10:20], f"bytes 10-19/{size}")
    r = app_client.get(url, headers={**headers, "Range": "bytes=-7"})
    assert (r.status_code, r.content) == (206, full[-7:])
    r = app_client.get(url, headers={**headers, "Range": f"bytes=5-{size * 2}"})  # end clamped
    assert (r.status_code, r.content) == (206, full[5:])

    # resume: an interrupted download continues where it stopped and hashes to the target
    part1 = app_client.get(url, headers={**headers, "Range": "bytes=0-4095"}).content
    part2 = app_client.get(url, headers={**headers, "Range": f"bytes={len(part1)}-"}).content
    assert hashlib.sha256(part1 + part2).hexdigest() == published["1.1.0"]["sha256"]

    # absurdly long positions saturate (int() of > 4,300 digits raised ValueError, a 500)
    r = app_client.get(url, headers={**headers, "Range": f"bytes=5-{'9' * 5000}"})
    assert (r.status_code, r.content) == (206, full[5:])
    r = app_client.get(url, headers={**headers, "Range": f"bytes=-{'9' * 5000}"})
    assert (r.status_code, r.content) == (206, full)

    for bad in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0", f"bytes={'9' * 5000}-"):
        r = app_client.get(url, headers={**headers, "Range": bad})
        assert r.status_code == 416, bad
        assert r.headers["content-range"] == f"bytes */{size}"

    # malformed and multi-range requests get the whole file (RFC 9110 allows ignoring Range)
    for ignored in ("bytes=0-1,5-6", "items=0-5", "bytes=9-3", "bytes=abc"):
        r = app_client.get(url, headers={**headers, "Range": ignored})
        assert (r.status_code, r.content) == (200, full), ignored

    # If-Range: a stale validator gets the whole file; the current one gets the range
    etag = app_client.get(url, headers=headers).headers["etag"]
    r = app_client.get(url, headers={**headers, "Range": "bytes=10-", "If-Range": '"stale"'})
    assert (r.status_code, r.content) == (200, full)
    r = app_client.get(url, headers={**headers, "Range": "bytes=10-", "If-Range": etag})
    assert (r.status_code, r.content) == (206, full[10:])


def test_large_target_is_streamed_in_chunks(app_client, device, ctx, tmp_path):
    from server.http.routers.tuf import CHUNK_BYTES

    data = os.urandom(3 * CHUNK_BYTES + 123)
    src = tmp_path / "big.tar"
    src.write_bytes(data)
    info = ctx.repo.add_target("big/1.0.0/default/bundle.tar", src, {"model": "big"})
    url = f"/tuf/targets/big/1.0.0/default/{info.hashes['sha256']}.bundle.tar"
    with app_client.stream("GET", url, headers=auth(device["device_token"])) as r:
        assert r.status_code == 200
        chunks = list(r.iter_raw())
    assert b"".join(chunks) == data
    with app_client.stream(
        "GET", url, headers={**auth(device["device_token"]), "Range": f"bytes={CHUNK_BYTES - 1}-"}
    ) as r:
        assert r.status_code == 206
        assert r.read() == data[CHUNK_BYTES - 1 :]


# -- the device's view: tuf.ngclient ------------------------------------------------------------
def test_ngclient_refreshes_downloads_and_rejects_tampering(
    app_client, admin_headers, device, published, ctx, tmp_path
):
    assert device["tuf_root"] == ctx.repo.trusted_root()
    assert device["tuf_metadata_url"] == f"{BASE}/tuf/metadata/"
    up, fetcher = updater(app_client, device, tmp_path / "dev")
    up.refresh()
    for version, art in published.items():
        info = up.get_targetinfo(art["target_path"])
        assert info is not None, version
        assert info.length == art["length"]
        assert info.hashes == {"sha256": art["sha256"]}
        assert info.custom["version"] == version
        path = up.download_target(info)
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == art["sha256"]
    assert f"{BASE}{target_url(published['1.0.0'])}" in fetcher.urls  # consistent-snapshot names

    # flip one byte of the stored bundle (same length): ngclient must refuse it
    stored = ctx.repo.target_file(published["1.1.0"]["target_path"])
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    stored.write_bytes(bytes(raw))
    fresh, _ = updater(app_client, device, tmp_path / "dev2")
    fresh.refresh()
    info = fresh.get_targetinfo(published["1.1.0"]["target_path"])
    with pytest.raises(tuf_exc.LengthOrHashMismatchError):
        fresh.download_target(info)
    assert list((tmp_path / "dev2" / "targets").iterdir()) == []

    # revocation: a refreshed client no longer finds the version
    assert app_client.delete("/api/v1/models/resnet/versions/1.0.0", headers=admin_headers).status_code == 200
    later, _ = updater(app_client, device, tmp_path / "dev3")
    later.refresh()
    assert later.get_targetinfo(published["1.0.0"]["target_path"]) is None
    assert later.get_targetinfo(published["1.1.0"]["target_path"]) is not None


def test_timestamp_resigned_near_expiry_and_clients_follow(app_client, device, published, ctx, tmp_path):
    lifetime = ctx.settings.timestamp_expiry_s
    before = json.loads(app_client.get("/tuf/metadata/timestamp.json").content)["signed"]
    assert ctx.repo.refresh_expiring() == []
    up, _ = updater(app_client, device, tmp_path / "early")
    up.refresh()

    near = utcnow() + timedelta(seconds=lifetime * 0.6)  # less than half the lifetime left then
    assert ctx.repo.refresh_expiring(now=near) == ["timestamp"]
    after = json.loads(app_client.get("/tuf/metadata/timestamp.json").content)["signed"]
    assert after["version"] == before["version"] + 1
    assert after["expires"] > before["expires"]
    assert after["meta"] == before["meta"]  # same snapshot

    # a client that refreshed before accepts the new timestamp
    again, _ = updater(app_client, device, tmp_path / "early")
    again.refresh()
    assert again.get_targetinfo(published["1.1.0"]["target_path"]) is not None


def test_running_server_resigns_an_expiring_timestamp_by_itself(settings, tmp_path):
    """The lifespan's refresh job, not a direct call, keeps timestamp.json from expiring: at its
    first pass after start-up and again later, whenever less than half its lifetime is left."""
    from fastapi.testclient import TestClient
    from tuf.api.metadata import Metadata, Root, Timestamp

    from server.app import create_app
    from server.trust.repository import ImageRepository

    fast = settings.model_copy(update={"metadata_refresh_interval_s": 0.1, "timestamp_expiry_s": 120})
    # the same repository written 100 s ago: its timestamp has 20 of its 120 s left
    aged = ImageRepository(
        fast.repo_dir, fast.key_dir, timestamp_expiry_s=fast.timestamp_expiry_s,
        clock=lambda: utcnow() - timedelta(seconds=100),
    )  # fmt: skip
    aged.initialize()
    stale = aged.expires()["timestamp"]

    def timestamp(client) -> Timestamp:
        md = Metadata[Timestamp].from_bytes(client.get("/tuf/metadata/timestamp.json").content)
        root = Metadata[Root].from_dict(client.app.state.ctx.repo.trusted_root())
        root.verify_delegate(Timestamp.type, md)  # signed by the timestamp key of the trusted root
        return md.signed

    def wait_for_version(client, version: int) -> Timestamp:
        deadline = time.monotonic() + 20
        while (current := timestamp(client)).version < version:
            assert time.monotonic() < deadline, f"timestamp.json stayed at version {current.version}"
            time.sleep(0.05)
        return current

    with TestClient(create_app(fast)) as client:
        first = wait_for_version(client, 2)
        assert first.expires > stale
        assert first.snapshot_meta.version == 1  # the same snapshot, re-dated

        # later, while it runs: a publish dated 100 s ago leaves another timestamp near expiry
        bundle = tmp_path / "bundle.bin"
        bundle.write_bytes(b"bundle")
        aged.add_target("m/1.0.0/default/bundle.bin", bundle, {})  # timestamp version + 1
        again = wait_for_version(client, first.version + 2)
        assert again.expires >= first.expires
        assert again.snapshot_meta.version == 2  # the snapshot of that publish, re-dated
