"""Micro-batching on real onnxruntime sessions: concurrent requests run as one ``session.run``
where the model's first dimension is dynamic, one by one where it is not, and each caller gets
exactly its own rows back."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from device_client.protocol.bundle import extract_bundle
from device_client.runtime import load_slot
from server.cloud.batcher import AdmissionGate, Batcher, batchable
from tests.helpers.bundles import make_bundle
from tests.helpers.onnx_models import reference_output


def _loaded(tmp_path: Path, **kw):
    tar, manifest = make_bundle(tmp_path, **kw)
    slot = tmp_path / f"slot-{manifest.version}"
    extract_bundle(tar, slot)
    return load_slot(slot)


class Sizes:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, name: str, size: int) -> None:
        with self.lock:
            self.sizes.append(size)


def test_requests_arriving_together_run_as_one_batch(tmp_path):
    model = _loaded(tmp_path, seed=3)
    assert batchable(model)
    sizes = Sizes()
    batcher = Batcher("clf", window_s=30.0, max_batch=5, on_batch=sizes)  # closes at 5 requests
    try:
        xs = [np.random.default_rng(i).random((i + 1, 4), dtype=np.float32) for i in range(5)]
        futures = [batcher.submit(model, {"x": x}) for x in xs]
        for future, x in zip(futures, xs, strict=True):
            out = future.result(timeout=30)["y"]
            assert out.shape == (len(x), 3)
            np.testing.assert_allclose(out, reference_output(x, seed=3), rtol=1e-5, atol=1e-6)
    finally:
        batcher.close()
    assert sizes.sizes == [5]


def test_a_fixed_batch_dimension_runs_one_by_one(tmp_path):
    from server.onnx_models import make_model

    fixed = make_model(tmp_path / "fixed.onnx", seed=4, batch=1)
    signature = {
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 3]}],
    }
    model = _loaded(
        tmp_path, model_file=fixed, validation_x=np.zeros((1, 4), np.float32), manifest_overrides=signature
    )
    assert not batchable(model)
    sizes = Sizes()
    batcher = Batcher("fixed", window_s=30.0, max_batch=3, on_batch=sizes)
    try:
        xs = [np.full((1, 4), i, np.float32) for i in range(3)]
        results = [f.result(timeout=30)["y"] for f in [batcher.submit(model, {"x": x}) for x in xs]]
    finally:
        batcher.close()
    assert sizes.sizes == [1, 1, 1]
    for out, x in zip(results, xs, strict=True):
        np.testing.assert_allclose(out, reference_output(x, seed=4), rtol=1e-5, atol=1e-6)


def test_two_versions_in_one_window_each_run_on_their_own_model(tmp_path):
    v1 = _loaded(tmp_path, version="1.0.0", seed=1)
    v2 = _loaded(tmp_path, version="1.1.0", release=2, seed=2)
    sizes = Sizes()
    batcher = Batcher("clf", window_s=30.0, max_batch=4, on_batch=sizes)
    try:
        x = np.ones((1, 4), np.float32)
        futures = [batcher.submit(m, {"x": x}) for m in (v1, v2, v1, v2)]
        outs = [f.result(timeout=30)["y"] for f in futures]
    finally:
        batcher.close()
    assert sorted(sizes.sizes) == [2, 2]
    for out, seed in zip(outs, (1, 2, 1, 2), strict=True):
        np.testing.assert_allclose(out, reference_output(x, seed=seed), rtol=1e-5, atol=1e-6)


def test_a_cancelled_request_is_skipped_and_zero_window_batches_what_waits(tmp_path):
    model = _loaded(tmp_path)
    batcher = Batcher("clf", window_s=0.0, max_batch=8)
    try:
        x = np.zeros((1, 4), np.float32)
        gone = batcher.submit(model, {"x": x})
        gone.cancel()
        assert batcher.submit(model, {"x": x}).result(timeout=30)["y"].shape == (1, 3)
    finally:
        batcher.close()
    assert gone.cancelled()


def test_admission_gate_bounds_what_is_queued():
    gate = AdmissionGate(2)
    assert gate.try_enter()
    assert gate.try_enter()
    assert not gate.try_enter()
    assert gate.depth == 2
    gate.leave()
    assert gate.try_enter()


@pytest.mark.parametrize("window_s", [0.0, 0.005])
def test_close_answers_what_was_queued(tmp_path, window_s):
    model = _loaded(tmp_path)
    batcher = Batcher("clf", window_s=window_s, max_batch=4)
    futures = [batcher.submit(model, {"x": np.zeros((1, 4), np.float32)}) for _ in range(10)]
    batcher.close()
    assert all(f.result(timeout=1)["y"].shape == (1, 3) for f in futures)
