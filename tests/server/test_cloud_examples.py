"""Hard examples on a real cloud tier and control server: only requests marked ``fleet_collect``
by a device whose signed routing policy turns ``collect`` on are kept, under the byte caps (the
policy's per model, the cloud's for all; oldest dropped first, 0 keeps none); the admin-only
export gives the inputs and the cloud's answers back as ``.npz``; purge deletes them; audited."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest

from device_client.protocol.routing import RoutingPolicy
from server.cloud.serve import CloudThread
from server.devices.tables import Device
from server.examples.repository import HardExampleRepository
from server.examples.service import keep
from server.rollouts.desired import DesiredStateService
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


def _enroll(fleet, device_id, collect=True, max_bytes=256 * 1024 * 1024, cloud_model="clf"):
    """Enroll a device and sign it a DesiredState whose routing policy sets ``collect``."""
    device = fleet.enroll(device_id)
    policy = RoutingPolicy.model_validate({
        "mode": "prefer_edge",
        "confidence": {"output": "y", "softmax": True, "threshold": 0.6},
        "cloud": {"model": cloud_model},
        "collect": {"enabled": collect, "sample_rate": 1.0, "max_bytes": max_bytes},
    })  # fmt: skip
    with fleet.ctx.db.session_scope() as session:
        row = session.get(Device, device_id)
        DesiredStateService(session, fleet.ctx).assign(row, "clf", "1.0.0", routing=policy)
    return device


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
    a, b = _enroll(fleet, "dev-a"), _enroll(fleet, "dev-b")
    off = _enroll(fleet, "dev-off", collect=False)  # its policy does not ask
    other = _enroll(fleet, "dev-other", cloud_model="big")  # asks for another cloud model
    bare = fleet.enroll("dev-bare")  # no routing policy at all
    xs = [np.full((1, 4), i, np.float32) for i in range(4)]
    with CloudThread(fleet.cloud_settings("clf")) as cloud:
        cloud.wait_ready()
        _infer(cloud, a, xs[0], **COLLECT)
        _infer(cloud, a, xs[1])  # not marked (the sample missed it)
        _infer(cloud, b, xs[2], **COLLECT)
        _infer(cloud, b, xs[3], parameters={"fleet_collect": "yes"})  # only a JSON true counts
        for device in (off, other, bare):  # marked, but no signed policy of theirs asked
            _infer(cloud, device, xs[3], **COLLECT)
        text = httpx.get(f"{cloud.url}/metrics").text
    assert metric(text, "fleet_cloud_examples_total", result="kept") == 2
    assert metric(text, "fleet_cloud_examples_total", result="not_asked") == 3
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


@pytest.mark.parametrize("whose", ["cloud", "policy"])
def test_the_cap_drops_the_oldest_and_zero_keeps_none(fleet, whose):
    device = _enroll(fleet, "dev-1")
    xs = [np.full((1, 4), i, np.float32) for i in range(5)]
    with CloudThread(fleet.cloud_settings("clf")) as cloud:
        cloud.wait_ready()
        _infer(cloud, device, xs[0], **COLLECT)
    one = _stored_bytes(fleet)
    assert one > 0
    cap = 2 * one + one // 2  # room for two
    if whose == "policy":  # the policy's collect.max_bytes, under a larger cloud ceiling
        device, over = _enroll(fleet, "dev-2", max_bytes=cap), {}
    else:
        over = {"cloud_examples_max_bytes": cap}
    with CloudThread(fleet.cloud_settings("clf", **over)) as cloud:
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
    device = _enroll(fleet, "dev-1")
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


def _keep(session, model, device_id, model_cap=10**9, max_bytes=10**9):
    x = np.zeros((1, 4), np.float32)
    keep(
        session, model=model, version="1", device_id=device_id, inputs={"x": x}, outputs={},
        model_cap=model_cap, max_bytes=max_bytes,
    )  # fmt: skip


def test_the_model_cap_drops_that_models_oldest_across_many_rows(ctx):
    with ctx.db.session_scope() as session:
        _keep(session, "other", "o0")  # the oldest row of all, another model's
        for i in range(300):  # more than one page of the oldest-first scan
            _keep(session, "m", f"d{i}")
    with ctx.db.session_scope() as session:
        one = HardExampleRepository(session).total_bytes("m") // 300
        _keep(session, "m", "new", model_cap=10 * one)
    with ctx.db.session_scope() as session:
        repo = HardExampleRepository(session)
        assert [r.device_id for r in repo.select("m", None, None)] == [f"d{i}" for i in range(291, 300)] + [
            "new"
        ]
        assert [r.device_id for r in repo.select("other", None, None)] == ["o0"]
        _keep(session, "m", "newer", max_bytes=10 * one)  # the ceiling over all: o0 goes first
        assert repo.select("other", None, None) == []
