"""Hard examples on a real cloud tier and control server: only requests marked ``fleet_collect``
are kept, under the byte cap (oldest dropped first, 0 keeps none); the admin-only export gives
the inputs and the cloud's answers back as ``.npz``; purge deletes them; both are audited."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest

from server.cloud.serve import CloudThread
from server.examples.repository import HardExampleRepository
from server.examples.service import keep
from tests.helpers.cloud import infer_body, metric, reference, start_fleet
from tests.helpers.onnx_models import make_model
from tests.helpers.tokens import create_admin_token

COLLECT = {"parameters": {"fleet_collect": True}}


@pytest.fixture
def fleet(settings, tmp_path):
    f = start_fleet(settings)
    f.push("clf", "1.0.0", make_model(tmp_path / "m.onnx", seed=3))
    yield f
    f.close()


def _infer(cloud, device, x, **extra):
    r = httpx.post(
        f"{cloud.url}/v2/models/clf/infer", json=infer_body(x, **extra), headers=device.headers(), timeout=60
    )
    assert r.status_code == 200, r.text
    return r


def _export(fleet, **params):
    r = fleet.admin.get("/api/v1/models/clf/examples", params=params)
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(r.content), allow_pickle=False), int(r.headers["x-fleet-examples"])


def _stored_bytes(fleet):
    with fleet.ctx.db.session_scope() as session:
        return HardExampleRepository(session).total_bytes()


def test_only_requests_marked_collect_are_kept_and_exported(fleet):
    a, b = fleet.enroll("dev-a"), fleet.enroll("dev-b")
    xs = [np.full((1, 4), i, np.float32) for i in range(4)]
    with CloudThread(fleet.cloud_settings("clf")) as cloud:
        cloud.wait_ready()
        _infer(cloud, a, xs[0], **COLLECT)
        _infer(cloud, a, xs[1])  # the policy did not ask (or the sample missed it)
        _infer(cloud, b, xs[2], **COLLECT)
        _infer(cloud, b, xs[3], parameters={"fleet_collect": "yes"})  # only a JSON true counts
        text = httpx.get(f"{cloud.url}/metrics").text
    assert metric(text, "fleet_cloud_examples_total", result="kept") == 2
    npz, count = _export(fleet)
    assert count == 2
    np.testing.assert_array_equal(npz["inputs/x"], np.concatenate([xs[0], xs[2]]))
    (out_key,) = [k for k in npz.files if k.startswith("outputs/")]
    expected = np.concatenate([reference(fleet.models[("clf", "1.0.0")], x) for x in (xs[0], xs[2])])
    np.testing.assert_allclose(npz[out_key], expected, rtol=1e-5, atol=1e-6)
    assert list(npz["device_ids"]) == ["dev-a", "dev-b"]
    assert list(npz["versions"]) == ["1.0.0", "1.0.0"]
    assert list(npz["rows"]) == [1, 1]
    assert len(npz["times"]) == 2
    limited, n = _export(fleet, limit=1)
    assert n == 1
    assert list(limited["device_ids"]) == ["dev-b"]


def test_the_cap_drops_the_oldest_and_zero_keeps_none(fleet):
    device = fleet.enroll("dev-1")
    xs = [np.full((1, 4), i, np.float32) for i in range(5)]
    with CloudThread(fleet.cloud_settings("clf")) as cloud:
        cloud.wait_ready()
        _infer(cloud, device, xs[0], **COLLECT)
    one = _stored_bytes(fleet)
    assert one > 0
    cap = 2 * one + one // 2  # room for two
    with CloudThread(fleet.cloud_settings("clf", cloud_examples_max_bytes=cap)) as cloud:
        cloud.wait_ready()
        for x in xs[1:]:
            _infer(cloud, device, x, **COLLECT)
    assert _stored_bytes(fleet) <= cap
    npz, count = _export(fleet)
    assert count == 2
    np.testing.assert_array_equal(npz["inputs/x"], np.concatenate(xs[3:]))

    r = fleet.admin.delete("/api/v1/models/clf/examples")
    assert r.status_code == 200
    assert r.json() == {"deleted": 2}
    with CloudThread(fleet.cloud_settings("clf", cloud_examples_max_bytes=0)) as cloud:
        cloud.wait_ready()
        _infer(cloud, device, xs[0], **COLLECT)  # still answered, never stored
        text = httpx.get(f"{cloud.url}/metrics").text
    assert metric(text, "fleet_cloud_examples_total", result="disabled") == 1
    assert _export(fleet)[1] == 0


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_export_and_purge_are_admin_only(fleet, role):
    headers = {"Authorization": f"Bearer {create_admin_token(fleet.ctx, role)}"}
    url = f"{fleet.server.url}/api/v1/models/clf/examples"
    assert httpx.get(url, headers=headers).status_code == 403
    assert httpx.delete(url, headers=headers).status_code == 403


def test_export_and_purge_are_audited(fleet):
    device = fleet.enroll("dev-1")
    with CloudThread(fleet.cloud_settings("clf")) as cloud:
        cloud.wait_ready()
        _infer(cloud, device, np.ones((1, 4), np.float32), **COLLECT)
    _export(fleet)
    assert fleet.admin.delete("/api/v1/models/clf/examples").json() == {"deleted": 1}
    assert _export(fleet)[1] == 0
    r = fleet.admin.get("/api/v1/audit", params={"target_id": "clf"})
    actions = [(e["action"], e["details"]) for e in r.json()["items"]]
    assert ("examples.purged", {"deleted": 1}) in actions
    exported = [d for a, d in actions if a == "examples.exported"]
    assert [d["count"] for d in exported] == [0, 1]  # newest first
    assert fleet.admin.get("/api/v1/models/BAD!/examples").status_code == 422


def test_the_cap_drops_the_oldest_across_many_rows(ctx):
    x = np.zeros((1, 4), np.float32)
    with ctx.db.session_scope() as session:
        for i in range(300):  # more than one page of the oldest-first scan
            keep(
                session,
                model="m",
                version="1",
                device_id=f"d{i}",
                inputs={"x": x},
                outputs={},
                max_bytes=10**9,
            )
    with ctx.db.session_scope() as session:
        one = HardExampleRepository(session).total_bytes() // 300
        keep(
            session, model="m", version="1", device_id="new", inputs={"x": x}, outputs={}, max_bytes=10 * one
        )
    with ctx.db.session_scope() as session:
        kept = HardExampleRepository(session).select("m", None, None)
        assert [r.device_id for r in kept] == [f"d{i}" for i in range(291, 300)] + ["new"]
