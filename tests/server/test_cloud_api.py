"""The cloud tier's Open Inference Protocol endpoints against a real server, a real image repository
with real pushed ONNX models, and the tier under uvicorn: answers compared with onnxruntime's own."""

from __future__ import annotations

import httpx
import numpy as np
import orjson
import pytest
from onnx import TensorProto, helper, save

from server.cloud.serve import CloudThread
from tests.helpers.cloud import infer_body, metric, reference, start_fleet, wait_for
from tests.helpers.onnx_models import make_model


@pytest.fixture
def fleet(settings):
    f = start_fleet(settings)
    yield f
    f.close()


@pytest.fixture
def served(fleet, tmp_path):
    """(fleet, cloud, device, model files): ``clf`` 1.0.0 and 1.1.0 pushed, the cloud serving
    ``clf`` (its newest) and ``clf@1.0.0``, and ``reg`` (an INT64 -> FP64 model of its own)."""
    m1 = make_model(tmp_path / "m1.onnx", seed=1)
    m2 = make_model(tmp_path / "m2.onnx", seed=2, bias=1.0)
    fleet.push("clf", "1.0.0", m1)
    fleet.push("clf", "1.1.0", m2)
    device = fleet.enroll("dev-1")
    cloud = CloudThread(fleet.cloud_settings("clf,clf@1.0.0")).start()
    cloud.wait_ready()
    yield fleet, cloud, device, {"1.0.0": m1, "1.1.0": m2}
    cloud.stop()


def test_health_and_server_metadata(served):
    _, cloud, _, _ = served
    assert httpx.get(f"{cloud.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{cloud.url}/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(f"{cloud.url}/v2").json()
    assert meta["name"] == "fleetota-cloud"
    assert "binary_tensor_data" in meta["extensions"]


def test_infer_answers_what_onnxruntime_answers(served):
    _, cloud, device, files = served
    x = np.random.default_rng(7).random((3, 4), dtype=np.float32)
    r = httpx.post(
        f"{cloud.url}/v2/models/clf/infer", json=infer_body(x, id="req-1"), headers=device.headers()
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("clf", "1.1.0", "req-1")
    assert (r.headers["x-fleet-model"], r.headers["x-fleet-model-version"]) == ("clf", "1.1.0")
    (out,) = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("y", "FP32", [3, 3])
    np.testing.assert_array_equal(
        np.array(out["data"], np.float32).reshape(3, 3), reference(files["1.1.0"], x)
    )

    # a pinned version, with nested data
    nested = {"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": x.tolist()}]}
    r = httpx.post(f"{cloud.url}/v2/models/clf/versions/1.0.0/infer", json=nested, headers=device.headers())
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "1.0.0"
    assert r.headers["x-fleet-model-version"] == "1.0.0"
    got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(3, 3)
    np.testing.assert_array_equal(got, reference(files["1.0.0"], x))


def test_binary_tensor_extension(served):
    _, cloud, device, files = served
    x = np.random.default_rng(8).random((2, 4), dtype=np.float32)
    head = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    )
    headers = {**device.headers(), "Inference-Header-Content-Length": str(len(head))}
    r = httpx.post(f"{cloud.url}/v2/models/clf/infer", content=head + x.tobytes(), headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta = orjson.loads(r.content[:n])
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": 24}
    got = np.frombuffer(r.content[n:], "<f4").reshape(2, 3)
    np.testing.assert_array_equal(got, reference(files["1.1.0"], x))


def test_model_metadata_and_readiness(served):
    _, cloud, device, _ = served
    r = httpx.get(f"{cloud.url}/v2/models/clf", headers=device.headers())
    assert r.status_code == 200, r.text
    assert r.json() == {
        "name": "clf",
        "versions": ["1.1.0", "1.0.0"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
    assert r.headers["x-fleet-model-version"] == "1.1.0"
    for path in ("/v2/models/clf/ready", "/v2/models/clf/versions/1.0.0/ready"):
        assert httpx.get(cloud.url + path, headers=device.headers()).status_code == 200
    ready = httpx.get(f"{cloud.url}/v2/models/clf/versions/1.0.0/ready", headers=device.headers())
    assert ready.json() == {"name": "clf", "version": "1.0.0", "ready": True}


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/nope/infer",
        "/v2/models/clf/versions/9.9.9/infer",
    ],
)
def test_unknown_model_or_version_is_404(served, path):
    _, cloud, device, _ = served
    x = np.zeros((1, 4), np.float32)
    r = httpx.post(cloud.url + path, json=infer_body(x), headers=device.headers())
    assert r.status_code == 404
    assert set(r.json()) == {"error"}
    assert httpx.get(cloud.url + path.removesuffix("/infer"), headers=device.headers()).status_code == 404
    assert (
        httpx.get(cloud.url + path.replace("/infer", "/ready"), headers=device.headers()).status_code == 404
    )


BAD_REQUESTS = [
    (b"{not json", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'{"inputs": []}', "inputs must be a list"),
    (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}', "has no data"),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP33", "data": [1, 2, 3, 4]}]}',
        "not supported",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1, -4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}',
        "non-negative",
    ),
    (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]}', "do not fill"),
    (
        b'{"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3]]}]}',
        "rectangular",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}]}',
        "strings",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1e39, 0, 0, 0]}]}',
        "range of FP32",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}',
        "axis 1 must be 4",
    ),
    (
        b'{"inputs": [{"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}',
        "missing input",
    ),
    (b'{"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}', "rank"),
    (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}', "takes FP32"),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}',
        "takes FP32",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],'
        b' "outputs": [{"name": "nope"}]}',
        "no output 'nope'",
    ),
    (
        b'{"id": 5, "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}',
        "id",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_REQUESTS)
def test_malformed_requests_are_400_with_the_reason(served, body, message):
    _, cloud, device, _ = served
    r = httpx.post(f"{cloud.url}/v2/models/clf/infer", content=body, headers=device.headers())
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    # the tier keeps answering, and the refused request gave its place in the queue back
    x = infer_body(np.zeros((1, 4), np.float32))
    assert httpx.post(f"{cloud.url}/v2/models/clf/infer", json=x, headers=device.headers()).status_code == 200
    assert cloud.service.gate.depth == 0


def test_other_datatypes(fleet, tmp_path):
    """An INT64 model and a BOOL one: each datatype in and out as onnxruntime has it."""

    def model(path, in_type, out_type, op):
        graph = helper.make_graph(
            [op],
            "t",
            [helper.make_tensor_value_info("a", in_type, ["N", 2])],
            [helper.make_tensor_value_info("b", out_type, ["N", 2])],
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        save(m, str(path))
        return path

    cast = helper.make_node("Cast", ["a"], ["b"], to=TensorProto.DOUBLE)
    fleet.push("ints", "1.0.0", model(tmp_path / "i.onnx", TensorProto.INT64, TensorProto.DOUBLE, cast))
    negate = helper.make_node("Not", ["a"], ["b"])
    fleet.push("flags", "1.0.0", model(tmp_path / "f.onnx", TensorProto.BOOL, TensorProto.BOOL, negate))
    device = fleet.enroll("dev-2")

    def infer(name, datatype, data):
        tensor = {"name": "a", "shape": [1, 2], "datatype": datatype, "data": data}
        return httpx.post(
            f"{cloud.url}/v2/models/{name}/infer", json={"inputs": [tensor]}, headers=device.headers()
        )

    with CloudThread(fleet.cloud_settings("ints,flags")) as cloud:
        cloud.wait_ready()
        r = infer("ints", "INT64", [2**40, -3])
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0] == {
            "name": "b",
            "datatype": "FP64",
            "shape": [1, 2],
            "data": [2.0**40, -3.0],
        }
        r = infer("ints", "INT64", [1.5, 2])
        assert r.status_code == 400
        assert "non-integer" in r.json()["error"]
        r = infer("flags", "BOOL", [True, False])
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [False, True]
        r = infer("flags", "BOOL", [1, 0])
        assert r.status_code == 400
        assert "BOOL cannot hold integers" in r.json()["error"]


def test_not_ready_while_a_configured_model_is_missing(fleet, tmp_path):
    fleet.push("clf", "1.0.0", make_model(tmp_path / "m.onnx"))
    with CloudThread(fleet.cloud_settings("clf,ghost")) as cloud:
        wait_for(lambda: cloud.service.registry.synced, what="the first refresh")
        r = httpx.get(f"{cloud.url}/v2/health/ready")
        assert r.status_code == 503
        assert "ghost" in r.json()["error"]
        assert metric(httpx.get(f"{cloud.url}/metrics").text, "fleet_cloud_ready") == 0
