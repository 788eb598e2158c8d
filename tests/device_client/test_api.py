"""The local HTTP inference API on real models, including concurrent clients through 20 hot-swaps."""

from __future__ import annotations

import http.client
import io
import json
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from device_client.api import InferenceServer
from device_client.runtime import ModelHost, ModelRejected
from tests.helpers.bundles import make_reshape_model
from tests.helpers.onnx_models import reference_output

X = np.random.default_rng(3).random((2, 4), dtype=np.float32)


class Client:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()

    def infer_json(self, inputs: dict, path: str = "/v1/infer"):
        body = json.dumps({"inputs": inputs}).encode()
        status, headers, data = self.request("POST", path, body, {"Content-Type": "application/json"})
        return status, headers, json.loads(data)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def served(make_slot) -> Iterator[tuple[ModelHost, InferenceServer]]:
    host = ModelHost("clf", warmup_runs=1)
    host.install(make_slot("1.0.0", scale=1.0))
    server = InferenceServer(host, port=0, max_body_bytes=64 * 1024)
    server.start()
    try:
        yield host, server
    finally:
        server.stop()
        host.close()


def test_json_inference(served) -> None:
    _, server = served
    c = Client(server.port)
    status, headers, doc = c.infer_json({"x": X.tolist()})
    assert status == 200
    assert (doc["model"], doc["version"]) == ("clf", "1.0.0")
    assert headers["X-Fleet-Model"] == "clf"
    assert headers["X-Fleet-Model-Version"] == "1.0.0"
    np.testing.assert_allclose(np.array(doc["outputs"]["y"], np.float32), reference_output(X), rtol=1e-5)
    # keep-alive: a second request on the same connection
    assert c.infer_json({"x": X.tolist()})[0] == 200
    c.close()


def test_npy_inference(served) -> None:
    _, server = served
    buf = io.BytesIO()
    np.save(buf, X)
    c = Client(server.port)
    npy = {"Content-Type": "application/x-npy"}
    status, headers, data = c.request("POST", "/v1/infer", buf.getvalue(), npy)
    assert status == 200
    assert headers["Content-Type"] == "application/x-npy"
    assert headers["X-Fleet-Model-Version"] == "1.0.0"
    np.testing.assert_allclose(np.load(io.BytesIO(data)), reference_output(X), rtol=1e-5)


@pytest.mark.parametrize(
    ("body", "ctype", "status", "needle"),
    [
        (b'{"inputs": {"z": [[1, 2, 3, 4]]}}', "application/json", 400, "unknown input 'z'"),
        (b'{"inputs": {}}', "application/json", 400, "expected inputs"),
        (b'{"inputs": {"x": [[1, 2, 3]]}}', "application/json", 400, "axis 1 must be 4"),
        (b'{"inputs": {"x": [1, 2, 3, 4]}}', "application/json", 400, "rank 1"),
        (b'{"inputs": {"x": [[1, 2], [3]]}}', "application/json", 400, "not a float32 array"),
        (b'{"inputs": {"x": [["a", "b", "c", "d"]]}}', "application/json", 400, "not a float32 array"),
        (b'{"inputs": ', "application/json", 400, "malformed JSON"),
        (b"[1, 2]", "application/json", 400, "body must be"),
        (b"\x93NUMPY garbage", "application/x-npy", 400, "malformed .npy"),
    ],
)
def test_bad_input_is_400_and_server_survives(served, body, ctype, status, needle) -> None:
    host, server = served
    c = Client(server.port)
    got, _, data = c.request("POST", "/v1/infer", body, {"Content-Type": ctype})
    assert got == status
    assert needle in json.loads(data)["error"]
    assert host.health.snapshot_and_reset().errors == 0
    c2 = Client(server.port)
    assert c2.infer_json({"x": X.tolist()})[0] == 200


def test_npy_with_wrong_dtype_is_400(served) -> None:
    _, server = served
    buf = io.BytesIO()
    np.save(buf, X.astype(np.float64))
    got, _, data = Client(server.port).request(
        "POST", "/v1/infer", buf.getvalue(), {"Content-Type": "application/x-npy"}
    )
    assert got == 400
    assert "dtype float64" in json.loads(data)["error"]


def test_body_too_large_is_refused_unread(served) -> None:
    _, server = served
    big = json.dumps({"inputs": {"x": np.zeros((5000, 4)).tolist()}}).encode()
    assert len(big) > 64 * 1024
    status, headers, data = Client(server.port).request(
        "POST", "/v1/infer", big, {"Content-Type": "application/json"}
    )
    assert status == 413
    assert "exceeds the limit" in json.loads(data)["error"]
    assert headers.get("Connection") == "close"


def test_routes_and_health(served) -> None:
    _, server = served
    c = Client(server.port)
    assert c.request("POST", "/v1/nothing", b"{}")[0] == 404
    assert c.infer_json({"x": X.tolist()}, path="/v1/models/clf/infer")[0] == 200
    status, _, doc = c.infer_json({"x": X.tolist()}, path="/v1/models/other/infer")
    assert status == 404
    assert "no model 'other'" in doc["error"]
    status, _, data = c.request("GET", "/v1/health")
    assert status == 200
    assert json.loads(data) == {
        "status": "ok",
        "models": {
            "clf": {
                "model": "clf", "version": "1.0.0", "previous": None, "previous_warm": False, "shadow": None
            }
        },
    }
    assert c.request("GET", "/nope")[0] == 404


def test_several_models_need_the_named_route(make_slot) -> None:
    a = ModelHost("clf", warmup_runs=0)
    a.install(make_slot("1.0.0"))
    b = ModelHost("reg", warmup_runs=0)
    b.install(make_slot("3.0.0", name="reg", scale=3.0))
    server = InferenceServer({"clf": a, "reg": b}, port=0)
    server.start()
    try:
        c = Client(server.port)
        status, _, doc = c.infer_json({"x": X.tolist()})
        assert status == 400
        assert "use /v1/models/<name>/infer" in doc["error"]
        status, headers, doc = c.infer_json({"x": X.tolist()}, path="/v1/models/reg/infer")
        assert (status, headers["X-Fleet-Model"], doc["version"]) == (200, "reg", "3.0.0")
        np.testing.assert_allclose(np.array(doc["outputs"]["y"]), reference_output(X, scale=3.0), rtol=1e-5)
    finally:
        server.stop()


def test_no_model_is_503_and_model_error_is_500(make_slot, tmp_path) -> None:
    host = ModelHost("clf", warmup_runs=0)
    server = InferenceServer(host, port=0)
    server.start()
    try:
        c = Client(server.port)
        assert c.infer_json({"x": X.tolist()})[0] == 503
        assert json.loads(c.request("GET", "/v1/health")[2])["status"] == "no_model"
        host.install(
            make_slot(
                model_file=make_reshape_model(tmp_path / "r.onnx"),
                validation_x=np.ones((3, 4), np.float32),
                manifest_overrides={"outputs": [{"name": "y", "dtype": "float32", "shape": ["M", 3]}]},
            )
        )
        status, _, doc = c.infer_json({"x": [[1, 2, 3, 4]]})
        assert status == 500
        assert "inference failed" in doc["error"]
        assert c.infer_json({"x": np.ones((3, 4)).tolist()})[0] == 200
    finally:
        server.stop()


def test_nan_outputs_become_null(make_slot) -> None:
    host = ModelHost("clf", warmup_runs=0)
    host.install(make_slot(nan_on_negative=True))
    server = InferenceServer(host, port=0)
    server.start()
    try:
        status, _, doc = Client(server.port).infer_json({"x": (-X).tolist()})
        assert status == 200
        assert doc["outputs"]["y"][0] == [None, None, None]
        assert host.health.snapshot_and_reset().errors == 1
    finally:
        server.stop()


def test_concurrent_clients_through_20_hot_swaps(make_slot) -> None:
    """Two client threads hammer the HTTP API while the model is swapped 20 times (real loads)."""
    slots = {"1.0.0": make_slot("1.0.0", scale=1.0), "2.0.0": make_slot("2.0.0", scale=2.0)}
    scales = {"1.0.0": 1.0, "2.0.0": 2.0}
    host = ModelHost("clf", warmup_runs=1)
    host.install(slots["1.0.0"])
    server = InferenceServer(host, port=0)
    server.start()
    stop = threading.Event()
    failures: list[str] = []
    answered: list[dict[str, int]] = [{}, {}]

    def client(idx: int) -> None:
        c = Client(server.port)
        rng = np.random.default_rng(idx)
        try:
            while not stop.is_set():
                x = rng.random((3, 4), dtype=np.float32)
                status, headers, doc = c.infer_json({"x": x.tolist()})
                version = headers.get("X-Fleet-Model-Version")
                if status != 200 or version != doc.get("version"):
                    failures.append(f"status {status} {doc}")
                    continue
                want = reference_output(x, scale=scales[version])
                if not np.allclose(np.array(doc["outputs"]["y"], np.float32), want, rtol=1e-5, atol=1e-6):
                    failures.append(f"answer does not match version {version}")
                answered[idx][version] = answered[idx].get(version, 0) + 1
        except Exception as exc:  # a dropped connection is a failure too
            failures.append(repr(exc))
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            version = "2.0.0" if i % 2 == 0 else "1.0.0"
            before = sum(sum(a.values()) for a in answered)
            host.install(slots[version])
            # let some requests land on each new model before the next swap
            while sum(sum(a.values()) for a in answered) < before + 10 and not failures:
                stop.wait(0.001)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        server.stop()
    assert failures == []
    total = sum(sum(a.values()) for a in answered)
    assert total >= 200
    for a in answered:
        assert set(a) == {"1.0.0", "2.0.0"}
    w = host.health.snapshot_and_reset()
    assert w.errors == 0


def test_rejected_model_keeps_the_api_answering(served, make_slot) -> None:
    host, server = served
    with pytest.raises(ModelRejected):
        host.install(make_slot("9.0.0", perturb_validation=1.0))
    status, headers, _ = Client(server.port).infer_json({"x": X.tolist()})
    assert (status, headers["X-Fleet-Model-Version"]) == (200, "1.0.0")
