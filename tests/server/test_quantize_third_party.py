"""``--quantize int8`` on a real third-party model: PP-OCR's text-direction classifier from PyPI's
``rapidocr-onnxruntime`` wheel (tests/helpers/third_party_models.py; skipped when it could not be
fetched), pushed with synthetic text lines as validation inputs. The int8 build is published or
refused by ``min_agreement`` on the agreement it measures, which is what the two models give."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from device_client.protocol.bundle import ValidationSpec, extract_bundle
from server.catalog.quantize import agreement
from tests.helpers.catalog import auth, npz_bytes
from tests.helpers.third_party_models import ppocr_cls_or_skip, text_lines

#: validation lines (3x48x192 float32: 3.5 MB); the int8 builds disagree with fp32 on a few
ROWS = 32


@pytest.fixture(scope="module")
def model():
    return ppocr_cls_or_skip()


@pytest.fixture(scope="module")
def lines():
    return text_lines(ROWS, seed=0)


@pytest.fixture
def settings(settings):
    """Room for the model (0.6 MB), the validation lines and the calibration lines in one push."""
    return settings.model_copy(update={"max_upload_bytes": 16 * 1024 * 1024})


@pytest.fixture
def operator_headers(make_token):
    return auth(make_token("operator"))


def push(app_client, headers, model, x, version, calibration_data=None, **fields):
    data = {"version": version, "quantize": "int8"} | fields
    files = {
        "file": ("cls.onnx", model.read_bytes(), "application/octet-stream"),
        "validation": ("v.npz", npz_bytes(**{"inputs/x": x}), "application/octet-stream"),
    }
    if calibration_data is not None:
        files["calibration_data"] = (
            "c.npz",
            npz_bytes(**{"inputs/x": calibration_data}),
            "application/octet-stream",
        )
    return app_client.post("/api/v1/models/textdir/versions", data=data, files=files, headers=headers)


def run(path, x) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {"scores": session.run(None, {"x": x})[0]}


def test_the_lines_read_as_text_to_the_model(model, lines):
    """The fp32 classifier tells most synthetic lines' orientation: they are text to it."""
    x, turned = lines
    scores = run(model, x)["scores"]
    assert scores.shape == (ROWS, 2)
    assert np.mean(np.argmax(scores, axis=1) == turned) >= 0.75


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("calibration", ["dynamic", "static"])
def test_int8_published_or_refused_by_min_agreement(
    app_client, operator_headers, ctx, model, lines, tmp_path, calibration
):
    x, _ = lines
    # static: calibrated on other lines than the validation ones (calibration_data implies static)
    fields = {"calibration_data": text_lines(16, seed=1)[0]} if calibration == "static" else {}
    r = push(app_client, operator_headers, model, x, "1.0.0", min_agreement="0", **fields)
    assert r.status_code == 201, r.text
    int8 = next(v for v in r.json()["variants"] if v["variant"] == "int8")
    m = int8["measurements"]
    assert m["agreement_metric"] == "top1"
    assert m["calibration"] == ("static:uploaded" if fields else "dynamic")
    assert m["size_bytes"] > 0
    assert m["latency_ratio"] > 0

    # the recorded agreement is the one the published int8 model gives against fp32 on the lines
    out = tmp_path / "int8"
    extract_bundle(ctx.repo.target_file(int8["target_path"]), out)
    published = next(p for p in out.iterdir() if p.suffix == ".onnx")
    share, _ = agreement(run(model, x), run(published, x), ValidationSpec())
    assert m["agreement"] == pytest.approx(share, abs=1e-6)

    # a bar above it refuses the push with the numbers; at it, the push is published
    if share < 1.0:
        bar = share + 0.5 / ROWS
        r = push(app_client, operator_headers, model, x, "2.0.0", min_agreement=str(bar), **fields)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert f"agrees with fp32 on {share:.2%}" in detail
        assert f"below min_agreement {bar}" in detail
        assert "nothing was published" in detail
        assert (
            app_client.get("/api/v1/models/textdir/versions/2.0.0", headers=operator_headers).status_code
            == 404
        )
    r = push(app_client, operator_headers, model, x, "3.0.0", min_agreement=str(share), **fields)
    assert r.status_code == 201, r.text
