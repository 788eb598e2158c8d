"""The digits edge/cloud pair of bench/hybrid.py: it builds, both models load in onnxruntime with
a symbolic batch dimension and answer class probabilities, and the cloud model is the more
accurate on the held-out split."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from server.digits import CLASSES, INPUT, OUTPUT, PIXELS, build_digits_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_digits_pair(tmp_path_factory.mktemp("digits"))


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_held_out_split_is_scaled_pixels_and_labels(pair):
    assert pair.x_val.dtype == np.float32
    assert pair.x_val.shape[1] == PIXELS
    assert len(pair.x_val) == len(pair.y_val) > 500
    assert pair.x_val.min() >= 0.0
    assert pair.x_val.max() <= 1.0
    assert set(np.unique(pair.y_val)) == set(range(CLASSES))


@pytest.mark.parametrize("which", ["edge", "cloud"])
def test_model_takes_any_batch_and_answers_probabilities(pair, which):
    sess = session(getattr(pair, which))
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    assert (inp.name, out.name) == (INPUT, OUTPUT)
    assert isinstance(inp.shape[0], str)
    assert inp.shape[1] == PIXELS
    assert isinstance(out.shape[0], str)
    assert out.shape[1] == CLASSES
    for rows in (1, 7):
        probs = sess.run(None, {INPUT: pair.x_val[:rows]})[0]
        assert probs.shape == (rows, CLASSES)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        assert (probs >= 0).all()


def test_cloud_is_more_accurate_than_edge_on_held_out_split(pair):
    acc = {}
    for which in ("edge", "cloud"):
        probs = session(getattr(pair, which)).run(None, {INPUT: pair.x_val})[0]
        acc[which] = float((probs.argmax(axis=1) == pair.y_val).mean())
    assert acc["edge"] > 0.8  # a real classifier, not a guess
    assert acc["cloud"] > 0.95
    assert acc["cloud"] - acc["edge"] >= 0.03, acc


def test_edge_confidence_separates_right_from_wrong_answers(pair):
    """The edge's top probability is lower on the digits it gets wrong: what routing relies on."""
    probs = session(pair.edge).run(None, {INPUT: pair.x_val})[0]
    right = probs.argmax(axis=1) == pair.y_val
    top = probs.max(axis=1)
    assert top[~right].mean() < top[right].mean() - 0.1
