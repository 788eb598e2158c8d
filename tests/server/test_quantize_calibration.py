"""An uploaded calibration set (``calibration_data``) for the static int8 quantization on push:
used instead of the validation inputs, recorded in the measurements, and checked against the
model's inputs (a bad file is a 422 and nothing is published)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from device_client.protocol.bundle import extract_bundle
from server.catalog.quantize import Calibration, quantize_int8
from server.digits import build_digits_pair, digits_split
from tests.helpers.catalog import auth, nothing_published, npz_bytes


@pytest.fixture
def operator_headers(make_token):
    return auth(make_token("operator"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits_pair(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def calibration_rows():
    """200 training digits: rows the held-out validation split does not hold."""
    return digits_split()[0][:200]


def push(app_client, headers, model, *, validation=None, calibration_data=None, **fields):
    data = {"version": "1.0.0"} | fields
    files = {"file": ("model.onnx", model.read_bytes(), "application/octet-stream")}
    if validation is not None:
        files["validation"] = ("v.npz", validation, "application/octet-stream")
    if calibration_data is not None:
        files["calibration_data"] = ("c.npz", calibration_data, "application/octet-stream")
    return app_client.post("/api/v1/models/digits/versions", data=data, files=files, headers=headers)


def scales(path) -> dict[str, np.ndarray]:
    """The quantization scales of a QDQ model: what its calibration decided."""
    graph = onnx.load(str(path)).graph
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_scale")}


def test_static_calibration_on_the_uploaded_set(
    app_client, operator_headers, ctx, digits, calibration_rows, tmp_path
):
    r = push(
        app_client, operator_headers, digits.edge, quantize="int8",
        validation=npz_bytes(**{"inputs/x": digits.x_val}),
        calibration_data=npz_bytes(**{"inputs/x": calibration_rows}),
    )  # fmt: skip
    assert r.status_code == 201, r.text
    int8 = next(v for v in r.json()["variants"] if v["variant"] == "int8")["measurements"]
    assert (int8["calibration"], int8["calibration_rows"]) == ("static:uploaded", 200)
    assert int8["agreement_metric"] == "top1"

    out = tmp_path / "int8"
    extract_bundle(ctx.repo.target_file("digits/1.0.0/int8/bundle.tar"), out)
    published = next(p for p in out.iterdir() if p.suffix == ".onnx")
    # the scales are those a calibration on the uploaded rows gives, not on the validation inputs
    on_upload, on_validation = tmp_path / "upload.onnx", tmp_path / "validation.onnx"
    quantize_int8(digits.edge, on_upload, Calibration.static, {"x": calibration_rows})
    quantize_int8(digits.edge, on_validation, Calibration.static, {"x": digits.x_val})
    got, want, other = scales(published), scales(on_upload), scales(on_validation)
    assert got
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], want[name])
    assert any(not np.array_equal(got[n], other[n]) for n in got)
    # the measurement used the validation inputs: the bundle's validation vectors are those
    with np.load(out / "validation.npz") as vz:
        np.testing.assert_array_equal(vz["inputs/x"], digits.x_val)


def test_calibration_data_implies_static(app_client, operator_headers, digits, calibration_rows):
    r = push(
        app_client, operator_headers, digits.edge, quantize="int8", min_agreement="0",
        calibration_data=npz_bytes(**{"inputs/x": calibration_rows}),
    )  # fmt: skip
    assert r.status_code == 201, r.text
    int8 = next(v for v in r.json()["variants"] if v["variant"] == "int8")["measurements"]
    assert int8["calibration"] == "static:uploaded"


def test_validation_calibration_is_recorded_as_static(app_client, operator_headers, digits):
    r = push(
        app_client, operator_headers, digits.edge, quantize="int8", calibration="static",
        validation=npz_bytes(**{"inputs/x": digits.x_val}),
    )  # fmt: skip
    assert r.status_code == 201, r.text
    int8 = next(v for v in r.json()["variants"] if v["variant"] == "int8")["measurements"]
    assert (int8["calibration"], int8["calibration_rows"]) == ("static", len(digits.x_val))


X = np.zeros((4, 64), np.float32)
BAD = [
    (npz_bytes(**{"inputs/y": X}), {}, "calibration .npz has unexpected keys ['inputs/y']"),
    (
        npz_bytes(**{"inputs/x": X, "outputs/probabilities": X}),
        {},
        "unexpected keys ['outputs/probabilities']",
    ),
    (npz_bytes(**{"inputs/x": X.astype(np.float64)}), {}, "calibration input 'x' is float64"),
    (npz_bytes(**{"inputs/x": np.zeros((4, 32), np.float32)}), {}, "calibration input 'x' has shape [4, 32]"),
    (npz_bytes(**{"inputs/x": np.zeros((0, 64), np.float32)}), {}, "calibration .npz has no rows"),
    (b"not a zip", {}, "calibration file is not a readable .npz"),
    # 8 MiB unpacked (a few KB compressed) over the 4 MiB upload limit of the tests' settings
    (npz_bytes(True, **{"inputs/x": np.zeros((32768, 64), np.float32)}), {}, "unpacked, over the limit"),
    (npz_bytes(**{"inputs/x": X}), {"calibration": "dynamic"}, "not with calibration=dynamic"),
    (npz_bytes(**{"inputs/x": X}), {"quantize": None}, "apply only with quantize=int8"),
]


@pytest.mark.parametrize(("calibration_data", "fields", "message"), BAD)
def test_bad_calibration_data_is_422(
    app_client, operator_headers, ctx, digits, calibration_data, fields, message
):
    data = {k: v for k, v in ({"quantize": "int8"} | fields).items() if v is not None}
    r = push(app_client, operator_headers, digits.edge, calibration_data=calibration_data, **data)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    nothing_published(ctx)
