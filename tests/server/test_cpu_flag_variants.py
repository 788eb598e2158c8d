"""Variants that require CPU flags: the flags a device reports on connect decide whether it
gets the int8 build or the fp32 one."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from server.devices.tables import Device
from tests.helpers.catalog import auth
from tests.helpers.cpu_flags import VNNI_ONLY, flagged_fleet, push_int8

DEVICES = ("vnni-1", "plain-1")


@pytest.fixture
def operator_headers(make_token):
    return auth(make_token("operator"))


@pytest.fixture
def fleet(app_client, admin_headers, ctx):
    """Two devices enrolled without CPU flags, then online with the flags of their settings."""
    return flagged_fleet(app_client, admin_headers, ctx, {"vnni-1": "avx512_vnni,avx2", "plain-1": "avx2"})


def assigned_variant(app_client, headers, device_id: str) -> str:
    r = app_client.put(
        f"/api/v1/devices/{device_id}/desired", json={"model": "det", "version": "1.0.0"}, headers=headers
    )
    assert r.status_code == 200, r.text
    return r.json()["variant"]


def test_presence_refreshes_the_flags(ctx, fleet):
    with ctx.db.session_scope() as s:
        hw = {d.id: d.hardware.get("cpu_flags") for d in s.scalars(sa.select(Device))}
    assert hw == {"vnni-1": ["avx512_vnni", "avx2"], "plain-1": ["avx2"]}


def test_the_device_with_the_flag_gets_int8(app_client, operator_headers, fleet, onnx_model):
    r = push_int8(app_client, operator_headers, onnx_model(), int8_cpu_flags="avx512_vnni")
    assert r.status_code == 201, r.text
    variants = {v["variant"]: v["constraints"] for v in r.json()["variants"]}
    assert variants == {"default": {}, "int8": {"cpu_flags": ["avx512_vnni"]}}
    assert assigned_variant(app_client, operator_headers, "vnni-1") == "int8"
    assert assigned_variant(app_client, operator_headers, "plain-1") == "default"


def test_most_specific_variant_wins(app_client, operator_headers, fleet, onnx_model):
    """With an arch constraint on both builds, the one that also names CPU flags is preferred."""
    meta = '{"constraints": {"arch": ["x86_64"]}}'
    r = push_int8(app_client, operator_headers, onnx_model(), int8_cpu_flags="avx512_vnni", metadata=meta)
    assert r.status_code == 201, r.text
    assert assigned_variant(app_client, operator_headers, "vnni-1") == "int8"
    assert assigned_variant(app_client, operator_headers, "plain-1") == "default"


def test_cpu_flags_in_push_constraints(app_client, operator_headers, fleet, onnx_model):
    meta = '{"constraints": {"cpu_flags": "i8mm"}}'
    files = {"file": ("model.onnx", onnx_model().read_bytes(), "application/octet-stream")}
    r = app_client.post(
        "/api/v1/models/det/versions",
        data={"version": "1.0.0", "variant": "arm", "metadata": meta},
        files=files,
        headers=operator_headers,
    )
    assert r.status_code == 201, r.text
    assert r.json()["variants"][0]["constraints"] == {"cpu_flags": ["i8mm"]}
    r = app_client.put(
        "/api/v1/devices/vnni-1/desired", json={"model": "det", "version": "1.0.0"}, headers=operator_headers
    )
    assert r.status_code == 422
    assert "no variant of this version fits" in r.json()["detail"]


def preview(app_client, headers, **params):
    return app_client.get("/api/v1/rollouts/preview", params=params, headers=headers)


def test_preview_counts_devices_per_variant(app_client, operator_headers, ctx, fleet, onnx_model):
    r = push_int8(app_client, operator_headers, onnx_model(), int8_cpu_flags="avx512_vnni")
    assert r.status_code == 201, r.text
    r = preview(app_client, operator_headers, model="det", version="1.0.0")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["selected"], body["variants"], body["unfit"]) == (2, {"default": 1, "int8": 1}, 0)
    one = preview(app_client, operator_headers, model="det", version="1.0.0",
                  selector='{"device_ids": ["plain-1"]}').json()  # fmt: skip
    assert (one["selected"], one["variants"], one["unfit"]) == (1, {"default": 1, "int8": 0}, 0)


def test_preview_counts_devices_no_variant_fits(app_client, operator_headers, fleet, onnx_model):
    files = {"file": ("model.onnx", onnx_model().read_bytes(), "application/octet-stream")}
    r = app_client.post(
        "/api/v1/models/det/versions",
        data={"version": "1.0.0", "variant": "vnni", "metadata": VNNI_ONLY},
        files=files,
        headers=operator_headers,
    )
    assert r.status_code == 201, r.text
    body = preview(app_client, operator_headers, model="det", version="1.0.0").json()
    assert (body["variants"], body["unfit"], body["unfit_examples"]) == ({"vnni": 1}, 1, ["plain-1"])


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"model": "det", "version": "9.9.9"}, 404),
        ({"model": "det", "version": "1.0.0", "selector": "{not json"}, 422),
        ({"model": "det", "version": "1.0.0", "selector": '{"colour": "red"}'}, 422),
        ({"model": "det", "version": "1.0.0", "selector": "[" * 5000}, 422),  # nesting beyond the stack
        ({"model": "det"}, 422),
    ],
)
def test_preview_bad_input(app_client, operator_headers, fleet, onnx_model, params, status):
    assert push_int8(app_client, operator_headers, onnx_model()).status_code == 201
    r = preview(app_client, operator_headers, **params)
    assert r.status_code == status, r.text
