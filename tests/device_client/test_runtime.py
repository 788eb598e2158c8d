"""The onnxruntime host on real sessions: load/validate/reject, infer, errors, swap, rollback, shadow."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

from device_client.runtime import (
    BadInput,
    InferenceError,
    ModelHost,
    ModelRejected,
    NoModel,
    load_slot,
    outputs_agree,
)
from tests.helpers.bundles import make_reshape_model, validation_inputs
from tests.helpers.onnx_models import reference_output

X = np.random.default_rng(7).random((5, 4), dtype=np.float32)


def test_load_slot_validates_and_warms(make_slot) -> None:
    m = load_slot(make_slot("1.2.3", scale=2.0))
    assert (m.name, m.version) == ("clf", "1.2.3")
    assert m.input_names == ("x",)
    assert m.output_names == ("y",)
    assert m.load_ms > 0
    np.testing.assert_allclose(m.run({"x": X})[0], reference_output(X, scale=2.0), rtol=1e-5)


def test_rejects_validation_vectors_that_do_not_match(make_slot) -> None:
    slot = make_slot(perturb_validation=0.5)
    with pytest.raises(ModelRejected, match="differs from the recorded"):
        load_slot(slot)


def test_top1_compare_tolerates_small_numeric_drift(make_slot) -> None:
    # a tiny uniform shift fails allclose but keeps every arg-max
    drift = {"perturb_validation": 0.01}
    with pytest.raises(ModelRejected):
        load_slot(make_slot(**drift))
    load_slot(make_slot(validation={"rtol": 1e-5, "atol": 1e-6, "compare": "top1"}, **drift))
    # recorded outputs whose arg-max differs: rejected under top1 too
    slot = make_slot(validation={"compare": "top1"})
    with np.load(slot / "validation.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["outputs/y"] = arrays["outputs/y"][:, ::-1].copy()
    np.savez(slot / "validation.npz", **arrays)
    with pytest.raises(ModelRejected, match="top-1"):
        load_slot(slot)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"inputs": [{"name": "input", "dtype": "float32", "shape": ["N", 4]}]}, "input names"),
        ({"inputs": [{"name": "x", "dtype": "float64", "shape": ["N", 4]}]}, "bundle.json says float64"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": ["N"]}]}, "rank"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 5]}]}, "axis 1 is 4"),
        ({"outputs": [{"name": "logits", "dtype": "float32", "shape": ["N", 3]}]}, "output names"),
        ({"inputs": [{"name": "x", "dtype": "complex-ish", "shape": ["N", 4]}]}, "unknown dtype"),
    ],
)
def test_rejects_wrong_signature(make_slot, overrides, match) -> None:
    with pytest.raises(ModelRejected, match=match):
        load_slot(make_slot(manifest_overrides=overrides))


def test_rejects_missing_validation_key_and_garbage_model(make_slot) -> None:
    slot = make_slot()
    np.savez(slot / "validation.npz", **{"inputs/x": validation_inputs()})
    with pytest.raises(ModelRejected, match=r"lacks 'outputs/y'"):
        load_slot(slot)
    slot2 = make_slot()
    (slot2 / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ModelRejected, match="cannot load"):
        load_slot(slot2)
    slot3 = make_slot()
    (slot3 / "bundle.json").write_text("{")
    with pytest.raises(ModelRejected, match=r"unreadable bundle\.json"):
        load_slot(slot3)


def test_corrupt_validation_vectors_are_a_rejection(make_slot) -> None:
    truncated = make_slot()
    data = (truncated / "validation.npz").read_bytes()
    (truncated / "validation.npz").write_bytes(data[: len(data) // 2])  # zipfile.BadZipFile
    with pytest.raises(ModelRejected, match=r"unreadable validation\.npz"):
        load_slot(truncated)
    flipped = make_slot()
    data = bytearray((flipped / "validation.npz").read_bytes())
    data[100:110] = bytes(b ^ 0xFF for b in data[100:110])  # inside the first array: bad CRC-32
    (flipped / "validation.npz").write_bytes(bytes(data))
    with pytest.raises(ModelRejected, match=r"unreadable validation\.npz"):
        load_slot(flipped)


def test_a_failing_warm_up_is_a_rejection(make_slot, monkeypatch: pytest.MonkeyPatch) -> None:
    from device_client.runtime import LoadedModel

    slot = make_slot()
    real = LoadedModel.run
    runs: list[int] = []

    def run(self: LoadedModel, inputs: dict) -> list[np.ndarray]:
        runs.append(1)
        if len(runs) > 1:  # the validation run passes, the warm-up's fail
            raise RuntimeError("out of memory")
        return real(self, inputs)

    monkeypatch.setattr(LoadedModel, "run", run)
    with pytest.raises(ModelRejected, match="warm-up failed: RuntimeError: out of memory"):
        load_slot(slot, warmup_runs=2)


def test_infer_answers_and_times_every_request(make_slot) -> None:
    host = ModelHost("clf")
    with pytest.raises(NoModel):
        host.infer({"x": X})
    host.install(make_slot("1.0.0", scale=1.0))
    for _ in range(10):
        res = host.infer({"x": X})
        assert (res.model, res.version) == ("clf", "1.0.0")
        np.testing.assert_allclose(res.outputs["y"], reference_output(X), rtol=1e-5)
    w = host.health.snapshot_and_reset()
    assert (w.requests, w.errors) == (10, 0)
    assert w.p50_ms is not None
    assert w.p50_ms > 0


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({}, "expected inputs"),
        ({"z": X}, "missing input 'x'"),
        ({"x": X, "extra": X}, "expected inputs"),
        ({"x": X.astype(np.float64)}, "dtype float64"),
        ({"x": X[0]}, "rank 1"),
        ({"x": np.zeros((2, 5), np.float32)}, "axis 1 must be 4"),
        ({"x": [[1.0, 2.0, 3.0, 4.0]]}, "not a numpy array"),
    ],
)
def test_bad_inputs_are_rejected_and_not_counted(make_slot, inputs, match) -> None:
    host = ModelHost("clf")
    host.install(make_slot())
    with pytest.raises(BadInput, match=match):
        host.infer(inputs)
    assert host.health.snapshot_and_reset().requests == 0


def test_nan_outputs_are_returned_but_counted_as_errors(make_slot) -> None:
    host = ModelHost("clf")
    host.install(make_slot(nan_on_negative=True))
    ok = host.infer({"x": X})
    bad = host.infer({"x": -X})
    assert np.isfinite(ok.outputs["y"]).all()
    assert np.isnan(bad.outputs["y"]).all()
    w = host.health.snapshot_and_reset()
    assert (w.requests, w.errors) == (2, 1)


def test_model_exceptions_propagate_and_count(make_slot, tmp_path) -> None:
    model = make_reshape_model(tmp_path / "reshape.onnx")
    slot = make_slot(
        model_file=model,
        validation_x=np.ones((3, 4), np.float32),
        manifest_overrides={"outputs": [{"name": "y", "dtype": "float32", "shape": ["M", 3]}]},
    )
    host = ModelHost("clf")
    host.install(slot)
    assert host.infer({"x": np.ones((6, 4), np.float32)}).outputs["y"].shape == (8, 3)
    with pytest.raises(InferenceError, match=r"clf 1\.0\.0"):
        host.infer({"x": np.ones((1, 4), np.float32)})
    w = host.health.snapshot_and_reset()
    assert (w.requests, w.errors) == (2, 1)


def test_rejected_model_never_serves(make_slot) -> None:
    host = ModelHost("clf")
    host.install(make_slot("1.0.0"))
    with pytest.raises(ModelRejected):
        host.install(make_slot("2.0.0", perturb_validation=1.0))
    with pytest.raises(ModelRejected, match="this host serves 'clf'"):
        host.install(make_slot("2.0.0", name="other"))
    res = host.infer({"x": X})
    assert res.version == "1.0.0"
    np.testing.assert_allclose(res.outputs["y"], reference_output(X), rtol=1e-5)
    assert host.previous is None


def test_rollback_is_a_reference_flip_to_the_warm_previous(make_slot) -> None:
    host = ModelHost("clf")
    v1 = host.install(make_slot("1.0.0", scale=1.0))
    v2 = host.install(make_slot("2.0.0", scale=2.0))
    assert host.serving is v2
    assert host.previous is v1  # kept warm: the very same session object
    assert host.infer({"x": X}).version == "2.0.0"
    back = host.rollback()
    assert back is v1
    assert host.serving is v1
    assert back.session is v1.session
    assert host.previous is None  # the model rolled back from is released
    np.testing.assert_allclose(host.infer({"x": X}).outputs["y"], reference_output(X), rtol=1e-5)
    with pytest.raises(NoModel):
        host.rollback()


def test_swaps_cut_the_health_window_by_serving_version(make_slot) -> None:
    host = ModelHost("clf")
    host.install(make_slot("1.0.0", scale=1.0))
    host.infer({"x": X})
    host.infer({"x": X})
    host.install(make_slot("2.0.0", scale=2.0))
    host.infer({"x": X})
    host.rollback()
    host.infer({"x": X})
    assert [(v, s.requests) for v, s in host.health.drain_closed()] == [("1.0.0", 2), ("2.0.0", 1)]
    assert host.health.snapshot_and_reset().requests == 1  # served by 1.0.0 again


def test_rollback_without_warm_previous_reloads(make_slot) -> None:
    host = ModelHost("clf", keep_previous_warm=False)
    v1 = host.install(make_slot("1.0.0", scale=1.0))
    host.install(make_slot("2.0.0", scale=2.0))
    assert host.previous is None
    back = host.rollback()
    assert back.version == "1.0.0"
    assert back is not v1
    assert host.infer({"x": X}).version == "1.0.0"


def test_set_previous_cold_path(make_slot) -> None:
    host = ModelHost("clf")
    older = make_slot("0.9.0", scale=3.0)
    host.install(make_slot("1.0.0"))
    host.set_previous(older)
    assert host.previous is None
    assert host.rollback().version == "0.9.0"
    np.testing.assert_allclose(host.infer({"x": X}).outputs["y"], reference_output(X, scale=3.0), rtol=1e-5)


def test_shadow_identical_model_agrees_and_never_answers(make_slot) -> None:
    slot = make_slot("1.0.0")
    host = ModelHost("clf", shadow_sample_rate=1.0, shadow_queue_size=1000)
    host.install(slot)
    host.start_shadow(host.load(make_slot("1.1.0")), sample_rate=1.0)
    assert host.status()["shadow"] == "1.1.0"
    rng = np.random.default_rng(1)
    for _ in range(100):
        x = rng.random((3, 4), dtype=np.float32)
        assert host.infer({"x": x}).version == "1.0.0"
    assert host.stop_shadow() is not None
    p = host.health.since_mark()
    assert p.shadow_requests == 100
    assert p.agreement == 1.0
    assert p.shadow_p95_ms is not None


def test_shadow_different_model_low_agreement_candidate_never_answers(make_slot) -> None:
    host = ModelHost("clf", shadow_queue_size=1000)
    host.install(make_slot("1.0.0", seed=0))
    host.start_shadow(host.load(make_slot("2.0.0", seed=1)), sample_rate=1.0)
    rng = np.random.default_rng(2)
    for _ in range(100):
        x = rng.random((1, 4), dtype=np.float32) * 2 - 1
        res = host.infer({"x": x})
        assert res.version == "1.0.0"
        np.testing.assert_allclose(res.outputs["y"], reference_output(x, seed=0), rtol=1e-4, atol=1e-5)
    host.stop_shadow()
    p = host.health.since_mark()
    assert p.shadow_requests == 100
    assert p.agreement is not None
    assert p.agreement < 0.7


def test_a_new_shadow_candidate_starts_a_clean_shadow_window(make_slot) -> None:
    """Windows are published under the candidate shadowing at publish time: when the candidate
    changes mid-window, the previous one's comparisons must not count for the new one."""
    host = ModelHost("clf", shadow_queue_size=1000)
    host.install(make_slot("1.0.0", seed=0))
    host.start_shadow(host.load(make_slot("2.0.0", scale=-1.0)), sample_rate=1.0)  # never agrees
    for _ in range(20):
        host.infer({"x": X})
    host.start_shadow(host.load(make_slot("1.1.0")), sample_rate=1.0)  # same answers
    for _ in range(10):
        host.infer({"x": X})
    host.stop_shadow()
    window = host.health.snapshot_and_reset()
    assert (window.shadow_requests, window.agreement) == (10, 1.0)
    assert window.requests == 30  # the serving model's own counts are untouched


def test_shadow_drops_samples_instead_of_blocking(make_slot) -> None:
    host = ModelHost("clf", shadow_queue_size=1)
    host.install(make_slot("1.0.0"))
    host.start_shadow(host.load(make_slot("1.1.0", slow_factor=40)), sample_rate=1.0)
    for _ in range(200):
        host.infer({"x": X})
    host.stop_shadow()
    p = host.health.since_mark()
    assert p.requests == 200
    assert p.shadow_dropped > 0
    assert p.shadow_requests + p.shadow_dropped == 200


def test_shadow_sample_rate_samples_a_fraction(make_slot) -> None:
    host = ModelHost("clf", shadow_queue_size=10_000)
    host.install(make_slot("1.0.0"))
    host.start_shadow(host.load(make_slot("1.1.0")), sample_rate=0.1)
    for _ in range(1000):
        host.infer({"x": X})
    host.stop_shadow()
    p = host.health.since_mark()
    assert 30 <= p.shadow_requests + p.shadow_dropped <= 200


def test_outputs_agree_rules() -> None:
    a = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    assert outputs_agree([a], [a * 3], rtol=1e-3, atol=1e-4)  # same top-1
    assert not outputs_agree([a], [a[:, ::-1]], rtol=1e-3, atol=1e-4)
    v = np.array([1.0, 2.0], np.float32)
    assert outputs_agree([v], [v + 1e-6], rtol=1e-3, atol=1e-4)
    assert not outputs_agree([v], [v * 2], rtol=1e-3, atol=1e-4)
    assert not outputs_agree([v], [v[:1]], rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux-only")
def test_load_runs_at_lower_cpu_priority(make_slot) -> None:
    seen: list[int] = []

    def loader(path):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return load_slot(path)

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    host = ModelHost("clf", loader=loader, load_nice=5, load_idle=False)
    host.install(make_slot())  # nothing serves yet: nothing to protect, normal priority
    host.install(make_slot("1.0.1"))
    assert seen == [mine, min(mine + 5, 19)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # caller untouched
    host.load_nice = 0
    host.load(make_slot("1.1.0"))
    assert seen[-1] == mine


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux-only")
def test_load_runs_under_sched_idle_by_default_and_the_caller_keeps_its_policy(make_slot) -> None:
    policies: list[int] = []

    def loader(path):
        policies.append(os.sched_getscheduler(0))  # 0: the calling thread
        return load_slot(path)

    mine = os.sched_getscheduler(0)
    host = ModelHost("clf", loader=loader)
    host.install(make_slot())  # start-up: nothing serves yet
    host.install(make_slot("1.0.1"))
    assert policies == [os.SCHED_OTHER, os.SCHED_IDLE]
    assert os.sched_getscheduler(0) == mine == os.SCHED_OTHER
    host.load_idle, host.load_nice = False, 0
    host.load(make_slot("1.1.0"))
    assert policies[-1] == os.SCHED_OTHER


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux-only")
def test_a_cold_rollback_loads_at_normal_priority(make_slot) -> None:
    policies: list[int] = []

    def loader(path):
        policies.append(os.sched_getscheduler(0))
        return load_slot(path)

    host = ModelHost("clf", loader=loader, keep_previous_warm=False)
    host.install(make_slot())
    host.install(make_slot("1.1.0"))
    assert host.rollback().version == "1.0.0"
    assert policies == [os.SCHED_OTHER, os.SCHED_IDLE, os.SCHED_OTHER]  # start-up, update, rollback
