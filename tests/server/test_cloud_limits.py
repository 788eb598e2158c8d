"""The cloud tier's limits and micro-batching, on real pushed models: a per-device rate limit (429
with Retry-After), the body cap (413), the bounded queue (503), batches of concurrent requests (seen
in its /metrics), and the metrics themselves."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from server.cloud.serve import CloudThread
from tests.helpers.cloud import infer_body, metric, reference, start_fleet, wait_for
from tests.helpers.onnx_models import make_model


@pytest.fixture
def fleet(settings, tmp_path):
    f = start_fleet(settings)
    f.push("clf", "1.0.0", make_model(tmp_path / "m.onnx", seed=3))
    yield f
    f.close()


def _infer(cloud, device, x, model="clf"):
    return httpx.post(
        f"{cloud.url}/v2/models/{model}/infer", json=infer_body(x), headers=device.headers(), timeout=60
    )


def test_rate_limit_per_device_is_429_with_retry_after(fleet):
    a, b = fleet.enroll("dev-a"), fleet.enroll("dev-b")
    x = np.zeros((1, 4), np.float32)
    with CloudThread(fleet.cloud_settings("clf", cloud_rate_per_s=0.01, cloud_rate_burst=2)) as cloud:
        cloud.wait_ready()
        assert [_infer(cloud, a, x).status_code for _ in range(2)] == [200, 200]
        r = _infer(cloud, a, x)
        assert r.status_code == 429
        assert 1 <= int(r.headers["retry-after"]) <= math.ceil(1 / 0.01)
        assert "over its inference rate" in r.json()["error"]
        assert _infer(cloud, b, x).status_code == 200  # another device has a bucket of its own
        text = httpx.get(f"{cloud.url}/metrics").text
        assert metric(text, "fleet_cloud_errors_total", reason="rate_limited") == 1
        assert metric(text, "fleet_cloud_requests_total", model="clf", status="429") == 1


def test_body_over_the_cap_is_413(fleet):
    device = fleet.enroll("dev-1")
    with CloudThread(fleet.cloud_settings("clf", cloud_max_body_bytes=2048)) as cloud:
        cloud.wait_ready()
        big = infer_body(np.zeros((200, 4), np.float32))  # ~4 KB of JSON
        r = httpx.post(f"{cloud.url}/v2/models/clf/infer", json=big, headers=device.headers())
        assert r.status_code == 413
        assert "FLEET_CLOUD_MAX_BODY_BYTES" in r.json()["error"]

        def chunks():  # no Content-Length: counted as it streams
            yield b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ['
            for _ in range(1000):
                yield b"0.0, "
            yield b"0.0]}]}"

        r = httpx.post(f"{cloud.url}/v2/models/clf/infer", content=chunks(), headers=device.headers())
        assert r.status_code == 413
        assert _infer(cloud, device, np.zeros((1, 4), np.float32)).status_code == 200


def test_full_queue_is_503_and_the_admitted_requests_are_answered(fleet):
    """Two requests wait in a long batch window and fill a queue of two: a third is refused at
    once, the two are answered when the window closes."""
    device = fleet.enroll("dev-1")
    settings = fleet.cloud_settings("clf", cloud_max_queue=2, cloud_batch_window_ms=8000, cloud_max_batch=64)
    with CloudThread(settings) as cloud, ThreadPoolExecutor(2) as pool:
        cloud.wait_ready()
        xs = [np.full((1, 4), i, np.float32) for i in range(2)]
        waiting = [pool.submit(_infer, cloud, device, x) for x in xs]
        wait_for(lambda: cloud.service.gate.depth == 2, what="two queued requests")
        assert metric(httpx.get(f"{cloud.url}/metrics").text, "fleet_cloud_queue_depth") == 2
        r = _infer(cloud, device, np.zeros((1, 4), np.float32))
        assert r.status_code == 503
        assert "queue is full" in r.json()["error"]
        assert r.headers["retry-after"] == "1"
        for future, x in zip(waiting, xs, strict=True):
            answer = future.result()
            assert answer.status_code == 200, answer.text
            got = np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(1, 3)
            np.testing.assert_array_equal(got, reference(fleet.models[("clf", "1.0.0")], x))
        assert cloud.service.gate.depth == 0
        assert (
            metric(httpx.get(f"{cloud.url}/metrics").text, "fleet_cloud_errors_total", reason="queue_full")
            == 1
        )


def test_concurrent_requests_run_as_one_batch_and_get_their_own_answers(fleet, tmp_path):
    fixed = make_model(tmp_path / "fixed.onnx", seed=4, batch=1)  # no dynamic batch dimension
    fleet.push("fixed", "1.0.0", fixed)
    device = fleet.enroll("dev-1")
    n = 6
    # the batch closes when n requests are in: the long window only keeps it open until then
    settings = fleet.cloud_settings("clf,fixed", cloud_batch_window_ms=10_000, cloud_max_batch=n)
    with CloudThread(settings) as cloud, ThreadPoolExecutor(n) as pool:
        cloud.wait_ready()
        for model, path, rows in (("clf", fleet.models[("clf", "1.0.0")], 2), ("fixed", fixed, 1)):
            xs = [np.random.default_rng(i).random((rows, 4), dtype=np.float32) for i in range(n)]
            answers = list(pool.map(lambda x, m=model: _infer(cloud, device, x, m), xs))
            for answer, x in zip(answers, xs, strict=True):
                assert answer.status_code == 200, answer.text
                got = np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(rows, 3)
                np.testing.assert_allclose(got, reference(path, x), rtol=1e-6, atol=1e-6)
        text = httpx.get(f"{cloud.url}/metrics").text
    assert metric(text, "fleet_cloud_batch_size_max", model="clf") > 1
    assert metric(text, "fleet_cloud_batches_total", model="clf") < n
    assert metric(text, "fleet_cloud_batch_size_max", model="fixed") == 1  # run one by one
    assert metric(text, "fleet_cloud_batches_total", model="fixed") == n


def test_metrics_report_requests_errors_latency_and_models(fleet):
    device = fleet.enroll("dev-1")
    with CloudThread(fleet.cloud_settings("clf")) as cloud:
        cloud.wait_ready()
        for _ in range(3):
            assert _infer(cloud, device, np.zeros((1, 4), np.float32)).status_code == 200
        assert _infer(cloud, device, np.zeros((1, 5), np.float32)).status_code == 400
        assert (
            httpx.post(f"{cloud.url}/v2/models/made-up/infer", json={}, headers=device.headers()).status_code
            == 404
        )
        text = httpx.get(f"{cloud.url}/metrics").text
    assert metric(text, "fleet_cloud_requests_total", model="clf", status="200") == 3
    assert metric(text, "fleet_cloud_requests_total", model="clf", status="400") == 1
    assert (
        metric(text, "fleet_cloud_requests_total", model="-", status="404") == 1
    )  # no label per made-up name
    assert metric(text, "fleet_cloud_errors_total", reason="bad_request") == 1
    assert metric(text, "fleet_cloud_request_seconds", quantile="0.95") > 0
    assert metric(text, "fleet_cloud_queue_depth") == 0
    assert metric(text, "fleet_cloud_model_loaded", model="clf", version="1.0.0", default="true") == 1
    assert metric(text, "fleet_cloud_ready") == 1


def test_requests_in_flight_when_stopping_are_answered(fleet):
    device = fleet.enroll("dev-1")
    settings = fleet.cloud_settings("clf", cloud_batch_window_ms=1000, cloud_max_batch=64)
    cloud = CloudThread(settings).start()
    cloud.wait_ready()
    results: list[int] = []
    t = threading.Thread(
        target=lambda: results.append(_infer(cloud, device, np.zeros((1, 4), np.float32)).status_code)
    )
    t.start()
    wait_for(lambda: cloud.service.gate.depth == 1, what="a queued request")
    cloud.stop()
    t.join(30)
    assert results == [200]
