"""Reading confidence from edge outputs (max_prob, margin, entropy; logits or probabilities; batch
of one and batched) and the edge/cloud agreement rule, on numbers and on a real onnxruntime model."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest

from device_client.protocol.routing import AgreementSpec, ConfidenceKind, ConfidenceSpec
from device_client.routing.confidence import (
    SMALL_OUTPUT,
    ConfidenceError,
    answers_agree,
    is_confident,
    probabilities,
    read_confidence,
    row_scores,
    small_scores,
    softmax,
    top1,
)
from tests.helpers.routing_models import classifier

TOL = AgreementSpec(rtol=0.05, atol=1e-3)


def spec(kind="max_prob", threshold=0.8, softmax=False, output=None) -> ConfidenceSpec:
    return ConfidenceSpec(kind=kind, threshold=threshold, softmax=softmax, output=output)


def test_scores_per_kind():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    assert row_scores(p, ConfidenceKind.max_prob) == pytest.approx([0.7, 0.4])
    assert row_scores(p, ConfidenceKind.margin) == pytest.approx([0.5, 0.05])
    h0 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert row_scores(p, ConfidenceKind.entropy)[0] == pytest.approx(h0)
    assert row_scores(np.array([[1.0, 0.0]]), ConfidenceKind.entropy)[0] == 0.0  # 0 log 0 = 0


def test_entropy_is_surer_when_lower_and_nan_is_never_sure():
    assert is_confident(0.1, ConfidenceKind.entropy, 0.5)
    assert not is_confident(0.9, ConfidenceKind.entropy, 0.5)
    assert is_confident(0.9, ConfidenceKind.max_prob, 0.8)
    assert not is_confident(0.7, ConfidenceKind.margin, 0.8)
    for kind in ConfidenceKind:
        assert not is_confident(float("nan"), kind, 0.5)


def test_a_row_that_is_not_finite_is_never_sure_by_entropy():
    outs = {"p": np.array([[np.nan, 0.5], [0.2, 0.8]], np.float32)}
    c = read_confidence(outs, spec(kind="entropy", threshold=0.5))
    assert math.isnan(c.value)
    assert not c.confident  # not "0 nats: perfectly sure"


def test_softmax_is_stable_and_single_columns_are_binary():
    assert softmax(np.array([[1000.0, 0.0]]))[0] == pytest.approx([1.0, 0.0])
    assert probabilities(np.array([[0.9]]), apply_softmax=False)[0] == pytest.approx([0.1, 0.9])
    assert probabilities(np.array([[0.0]]), apply_softmax=True)[0] == pytest.approx([0.5, 0.5])


def test_batch_of_one_and_batched_requests():
    one = {"probs": np.array([0.9, 0.05, 0.05], np.float32)}  # no batch axis
    c = read_confidence(one, spec())
    assert (c.value, c.confident) == (pytest.approx(0.9), True)
    batch = {"probs": np.array([[0.95, 0.05], [0.6, 0.4]], np.float32)}
    c = read_confidence(batch, spec())
    assert c.value == pytest.approx(0.6)  # the least sure row speaks for the request
    assert not c.confident
    c = read_confidence(batch, spec(kind="entropy", threshold=0.5))
    assert c.value == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)), rel=1e-5)
    assert not c.confident


def test_the_named_output_and_errors():
    outs = {"emb": np.ones((1, 4), np.float32), "probs": np.array([[0.99, 0.01]], np.float32)}
    assert read_confidence(outs, spec(output="probs")).confident
    assert not read_confidence(outs, spec()).confident  # first output: emb, four equal scores
    with pytest.raises(ConfidenceError, match="no output 'logits'"):
        read_confidence(outs, spec(output="logits"))
    with pytest.raises(ConfidenceError, match="not numbers"):
        read_confidence({"s": np.array(["a"])}, spec())
    with pytest.raises(ConfidenceError, match="empty"):
        read_confidence({"p": np.zeros((0, 3), np.float32)}, spec())


def test_nan_in_the_edge_output_is_unsure():
    c = read_confidence({"p": np.array([[np.nan, 0.1, 0.2]], np.float32)}, spec(threshold=0.0))
    assert math.isnan(c.value)
    assert not c.confident


def test_confidence_of_a_real_model_follows_its_input(tmp_path):
    sess = ort.InferenceSession(str(classifier(tmp_path / "c.onnx")), providers=["CPUExecutionProvider"])

    def outputs(x):
        return {"logits": sess.run(None, {"x": np.asarray(x, np.float32)})[0]}

    s = spec(softmax=True, threshold=0.9, output="logits")
    unsure = read_confidence(outputs([[0, 0, 0, 0]]), s)
    assert unsure.value == pytest.approx(1 / 3, rel=1e-5)
    assert not unsure.confident
    sure = read_confidence(outputs([[3, -3, 3, -3]]), s)
    assert sure.confident
    mixed = read_confidence(outputs([[3, -3, 3, -3], [0, 0, 0, 0]]), s)
    assert not mixed.confident


def test_top1_for_scores_labels_and_binary_outputs():
    assert top1(np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])).tolist() == [1, 0]
    assert top1(np.array([0.1, 0.7, 0.2])).tolist() == [1]  # batch of one without a batch axis
    assert top1(np.array([2, 0, 1], np.int64)).tolist() == [2, 0, 1]  # labels
    assert top1(np.array([[0.2], [0.8]])).tolist() == [0, 1]
    assert top1(np.array([[-0.5], [0.5]]), logits=True).tolist() == [0, 1]


def test_agreement_is_top1_for_classifiers_and_tolerance_for_regressors():
    edge = np.array([[2.0, 1.0, 0.0]], np.float32)
    assert answers_agree(edge, np.array([[0.6, 0.3, 0.1]]), classifier=True, tol=TOL)
    assert not answers_agree(edge, np.array([[0.3, 0.6, 0.1]]), classifier=True, tol=TOL)
    reg = np.array([[10.0, 20.0]], np.float32)
    assert answers_agree(reg, np.array([[10.2, 19.5]]), classifier=False, tol=TOL)
    assert not answers_agree(reg, np.array([[12.0, 20.0]]), classifier=False, tol=TOL)
    assert not answers_agree(reg, np.array([10.0, 20.0]), classifier=False, tol=TOL)  # other shape
    batch = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert not answers_agree(batch, np.array([[1.0, 0.0], [1.0, 0.0]]), classifier=True, tol=TOL)


def test_scores_that_are_not_a_distribution_are_normalised():
    assert read_confidence({"p": np.array([[2.0, 2.0]])}, spec(threshold=0.6)).value == pytest.approx(0.5)
    zeros = {"p": np.zeros((1, 4))}
    assert not read_confidence(zeros, spec(threshold=0.3)).confident
    assert not read_confidence(zeros, spec(kind="entropy", threshold=0.5)).confident  # uniform: ln 4


def _cases() -> list[np.ndarray]:
    """Edge outputs of every kind the small path meets: probabilities, logits, negative and zero
    scores, huge logits (probabilities that underflow to 0), single columns, NaN/Inf rows, batches
    and rank 0 to 3, float16/32/64."""
    rng = np.random.default_rng(7)
    cases = [
        rng.dirichlet(np.ones(10), size=1),
        rng.dirichlet(np.ones(3), size=4),
        rng.normal(0, 3, (1, 10)),
        rng.normal(0, 50, (2, 5)),
        np.array([[1000.0, -1000.0, 3.0]]),
        np.zeros((1, 4)),
        np.array([[-1.0, -2.0, 0.0]]),
        np.array([[0.3]]),
        np.array([[-800.0], [800.0], [0.0]]),
        np.array([[np.nan, 0.5], [0.2, 0.8]]),
        np.array([[np.inf, 0.0]]),
        np.array([[0.5, 0.5]]),
        np.array([[0.0, 745.0, 745.0]]),  # a weight exp(-745) > 0 whose probability underflows to 0
        np.array([[5e-324, 2.0]]),  # the same for a subnormal score
        np.array(0.7),
        rng.random(6),
        rng.random((2, 3, 4)),
    ]
    return [c.astype(dt) for c in cases for dt in (np.float64, np.float32, np.float16)]


@pytest.mark.parametrize("kind", list(ConfidenceKind))
@pytest.mark.parametrize("logits", [False, True])
def test_the_small_output_path_scores_as_the_array_path(kind, logits):
    for case in _cases():
        want = row_scores(probabilities(case, apply_softmax=logits), kind)
        got = small_scores(case, kind, logits)
        assert len(got) == len(want), case
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"{kind} {case!r}")


def test_a_probability_that_underflows_to_zero_adds_nothing_to_the_entropy():
    # exp(-745) is the smallest float above 0; divided by 2 it is 0, and log(0) must not be taken
    logits = {"p": np.array([[0.0, 745.0, 745.0]], np.float32)}
    c = read_confidence(logits, spec(kind="entropy", threshold=0.5, softmax=True))
    assert c.value == pytest.approx(math.log(2))
    assert not c.confident
    scores = {"p": np.array([[5e-324, 2.0]])}
    assert read_confidence(scores, spec(kind="entropy", threshold=0.5)).value == 0.0


def test_large_outputs_take_the_array_path_with_the_same_rules():
    big = np.full((1, SMALL_OUTPUT + 1), 0.1, np.float32)
    big[0, 0] = 50.0
    c = read_confidence({"p": big}, spec(threshold=0.5))
    assert c.value == pytest.approx(50.0 / (50.0 + 0.1 * SMALL_OUTPUT), rel=1e-5)
    small = read_confidence({"p": big[:, :10]}, spec(threshold=0.5))
    assert small.value == pytest.approx(50 / 50.9, rel=1e-5)
    big[0, 3] = np.nan
    assert math.isnan(read_confidence({"p": big}, spec()).value)
    entropy = read_confidence({"p": big}, spec(kind="entropy", threshold=0.5))
    assert math.isnan(entropy.value)
    assert not entropy.confident  # not "0 nats: perfectly sure"
