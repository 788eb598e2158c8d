"""``--quantize int8`` on push: a real int8 build by onnxruntime, measured against fp32, and
refused (nothing published) when it agrees on too few validation inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from device_client.protocol.bundle import ValidationSpec, extract_bundle
from server.catalog.quantize import agreement
from server.catalog.validation import load_onnx
from server.digits import build_digits_pair
from tests.helpers.catalog import auth, nothing_published, npz_bytes, push


@pytest.fixture
def operator_headers(make_token):
    return auth(make_token("operator"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits_pair(tmp_path_factory.mktemp("digits"))


def _push_int8(app_client, headers, model, validation, **fields):
    data = {"version": "1.0.0", "quantize": "int8"} | {k: str(v) for k, v in fields.items()}
    files = {"file": ("model.onnx", model.read_bytes(), "application/octet-stream")}
    if validation is not None:
        files["validation"] = ("v.npz", validation, "application/octet-stream")
    return app_client.post("/api/v1/models/digits/versions", data=data, files=files, headers=headers)


@pytest.mark.parametrize("calibration", ["dynamic", "static"])
def test_push_builds_and_measures_an_int8_variant(
    app_client, operator_headers, ctx, digits, tmp_path, calibration
):
    validation = npz_bytes(**{"inputs/x": digits.x_val})
    r = _push_int8(app_client, operator_headers, digits.edge, validation, calibration=calibration)
    assert r.status_code == 201, r.text
    variants = {v["variant"]: v for v in r.json()["variants"]}
    assert sorted(variants) == ["default", "int8"]
    fp32, int8 = variants["default"]["measurements"], variants["int8"]["measurements"]
    assert (fp32["size_bytes"], fp32["agreement"]) == (digits.edge.stat().st_size, 1.0)
    assert (int8["agreement_metric"], int8["calibration"]) == ("top1", calibration)
    assert int8["latency_ratio"] > 0
    assert int8["size_bytes"] > 0

    # the int8 bundle is listed, holds a model that is not the fp32 file, and its recorded top-1
    # agreement is what the two models give on the validation inputs
    listed = ctx.repo.list_targets()
    assert sorted(listed) == ["digits/1.0.0/default/bundle.tar", "digits/1.0.0/int8/bundle.tar"]
    out = tmp_path / "int8"
    manifest = extract_bundle(ctx.repo.target_file("digits/1.0.0/int8/bundle.tar"), out)
    assert manifest.variant == "int8"
    model_file = next(p for p in out.iterdir() if p.suffix == ".onnx")
    assert model_file.read_bytes() != digits.edge.read_bytes()
    ops = {n.op_type for n in onnx.load(str(model_file)).graph.node}
    assert ops & {"DynamicQuantizeLinear", "QuantizeLinear", "MatMulInteger", "DequantizeLinear"}
    feeds = {"x": digits.x_val}
    ref = dict(zip(["probabilities"], load_onnx(digits.edge).session.run(None, feeds), strict=True))
    got = dict(zip(["probabilities"], load_onnx(model_file).session.run(None, feeds), strict=True))
    share, metric = agreement(ref, got, ValidationSpec())
    assert metric == "top1"
    assert int8["agreement"] == pytest.approx(share, abs=1e-6)
    assert share >= 0.99
    with np.load(out / "validation.npz") as vz:  # the device checks the int8 model's own outputs
        np.testing.assert_allclose(vz["outputs/probabilities"], got["probabilities"], rtol=1e-5, atol=1e-6)


def test_push_refused_below_min_agreement(app_client, operator_headers, ctx, onnx_model):
    model = onnx_model("reg.onnx", in_dim=8, out_dim=1, seed=3)  # a regression: tolerance metric
    meta = '{"validation": {"rtol": 1e-7, "atol": 0}}'
    data = {"version": "1.0.0", "quantize": "int8", "metadata": meta}
    files = {"file": ("model.onnx", model.read_bytes(), "application/octet-stream")}
    r = app_client.post("/api/v1/models/reg/versions", data=data, files=files, headers=operator_headers)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    for part in ("below min_agreement 0.99", "(tolerance)", "bytes", "latency", "nothing was published"):
        assert part in detail
    nothing_published(ctx)


def test_min_agreement_decides(app_client, operator_headers, ctx, onnx_model):
    """The same model that is refused at 0.99 is published when the operator accepts any agreement."""
    model = onnx_model("reg.onnx", in_dim=8, out_dim=1, seed=3)
    meta = '{"validation": {"rtol": 1e-7, "atol": 0}}'
    data = {"version": "1.0.0", "quantize": "int8", "metadata": meta, "min_agreement": "0"}
    files = {"file": ("model.onnx", model.read_bytes(), "application/octet-stream")}
    r = app_client.post("/api/v1/models/reg/versions", data=data, files=files, headers=operator_headers)
    assert r.status_code == 201, r.text
    int8 = next(v for v in r.json()["variants"] if v["variant"] == "int8")
    assert int8["measurements"]["agreement"] < 0.99


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"quantize": "int4"}, "quantize must be 'int8'"),
        ({"quantize": "int8", "min_agreement": "1.5"}, "within [0, 1]"),
        ({"quantize": "int8", "min_agreement": "lots"}, "not a number"),
        ({"quantize": "int8", "calibration": "magic"}, "calibration must be"),
        ({"min_agreement": "0.5"}, "only with quantize=int8"),
    ],
)
def test_bad_quantize_fields_are_422(app_client, operator_headers, ctx, onnx_model, fields, message):
    model = onnx_model()
    r = push_fields(app_client, operator_headers, model, fields)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    nothing_published(ctx)


def push_fields(app_client, headers, model, fields):
    files = {"file": ("model.onnx", model.read_bytes(), "application/octet-stream")}
    return app_client.post(
        "/api/v1/models/m/versions", data={"version": "1.0.0"} | fields, files=files, headers=headers
    )


def test_push_without_quantize_records_no_measurements(app_client, operator_headers, onnx_model):
    r = push(app_client, operator_headers, "plain", "1.0.0", onnx_model())
    assert r.status_code == 201, r.text
    assert [(v["variant"], v["measurements"]) for v in r.json()["variants"]] == [("default", {})]
