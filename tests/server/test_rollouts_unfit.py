"""Rollouts over devices no variant of the version fits: refused at creation (nothing created),
or, with ``skip_unfit``, created without them; and the engine giving each device the variant its
CPU flags fit when it notifies many at once."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Deployment, DesiredRecord, Rollout
from tests.helpers.catalog import auth
from tests.helpers.cpu_flags import VNNI_ONLY, flagged_fleet, push_int8, push_variant

FLAGS = {"plain-1": "avx2", "plain-2": "", "vnni-1": "avx512_vnni,avx2", "vnni-2": "avx512_vnni"}


@pytest.fixture
def operator_headers(make_token):
    return auth(make_token("operator"))


@pytest.fixture
def fleet(app_client, admin_headers, ctx):
    return flagged_fleet(app_client, admin_headers, ctx, FLAGS)


def body(**over) -> dict:
    return {"model": "det", "version": "1.0.0", "stages": [{"percent": 100, "soak_s": 0}]} | over


def rows(ctx, table) -> list:
    with ctx.db.session_scope() as s:
        return list(s.scalars(sa.select(table)))


@pytest.fixture
def vnni_only(app_client, operator_headers, fleet, onnx_model):
    """det 1.0.0 published as one variant that needs AVX-512 VNNI: plain-1 and plain-2 fit none."""
    r = push_variant(app_client, operator_headers, onnx_model(), "vnni", VNNI_ONLY)
    assert r.status_code == 201, r.text


def test_refused_when_devices_fit_no_variant(app_client, operator_headers, ctx, vnni_only):
    r = app_client.post("/api/v1/rollouts", json=body(), headers=operator_headers)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "2 of the 4 selected devices fit no variant of det 1.0.0" in detail
    assert "plain-1, plain-2" in detail
    assert "skip_unfit" in detail
    assert rows(ctx, Rollout) == []
    assert rows(ctx, Deployment) == []
    # the preview counts what creation checks
    preview = app_client.get(
        "/api/v1/rollouts/preview", params={"model": "det", "version": "1.0.0"}, headers=operator_headers
    ).json()
    assert (preview["unfit"], preview["unfit_examples"]) == (2, ["plain-1", "plain-2"])


def test_refused_when_no_selected_device_fits(app_client, operator_headers, ctx, vnni_only):
    selector = {"device_ids": ["plain-1", "plain-2"]}
    r = app_client.post(
        "/api/v1/rollouts", json=body(selector=selector, skip_unfit=True), headers=operator_headers
    )
    assert r.status_code == 422, r.text
    assert "none of the 2 selected devices fits a variant" in r.json()["detail"]
    assert rows(ctx, Rollout) == []


def test_skip_unfit_leaves_them_out(app_client, operator_headers, ctx, fleet, vnni_only):
    r = app_client.post("/api/v1/rollouts", json=body(skip_unfit=True), headers=operator_headers)
    assert r.status_code == 201, r.text
    state = r.json()
    assert (state["devices"], state["unfit_skipped"]) == (2, 2)
    assert state["unfit_skipped_examples"] == ["plain-1", "plain-2"]
    assert state["selector"] == {"tags": {}, "device_ids": [], "hardware": {
        "arch": None, "min_ram_mb": None, "providers": []}}  # fmt: skip
    assert any("2 selected device(s) fit no variant" in w for w in state["warnings"])
    assert sorted(d.device_id for d in rows(ctx, Deployment)) == ["vnni-1", "vnni-2"]

    engine = RolloutEngine(ctx)
    for _ in range(3):
        engine.tick()
        fleet.step()
    desired = {d.device_id: d.variant for d in rows(ctx, DesiredRecord)}
    assert desired == {"vnni-1": "vnni", "vnni-2": "vnni"}  # the others never get a DesiredState
    again = app_client.get(f"/api/v1/rollouts/{state['id']}", headers=operator_headers).json()
    assert (again["unfit_skipped"], again["devices"]) == (2, 2)
    assert "failed" not in again["phases"]


def test_skip_unfit_with_every_device_fitting(app_client, operator_headers, ctx, fleet, onnx_model):
    """A version without constraints fits every device: nothing is skipped, with or without the flag."""
    assert push_int8(app_client, operator_headers, onnx_model()).status_code == 201
    r = app_client.post("/api/v1/rollouts", json=body(skip_unfit=True), headers=operator_headers)
    assert r.status_code == 201, r.text
    assert (r.json()["devices"], r.json()["unfit_skipped"]) == (4, 0)


def test_engine_picks_each_device_its_variant(app_client, operator_headers, ctx, fleet, onnx_model):
    """Devices alike but for their CPU flags, notified in one tick, get the variant their flags fit."""
    r = push_int8(app_client, operator_headers, onnx_model(), int8_cpu_flags="avx512_vnni")
    assert r.status_code == 201, r.text
    r = app_client.post("/api/v1/rollouts", json=body(), headers=operator_headers)
    assert r.status_code == 201, r.text
    RolloutEngine(ctx).tick()
    desired = {d.device_id: d.variant for d in rows(ctx, DesiredRecord)}
    assert desired == {"plain-1": "default", "plain-2": "default", "vnni-1": "int8", "vnni-2": "int8"}
