"""Reading confidence from edge outputs, and whether an edge and a cloud answer agree.

Scores per row: ``max_prob`` (top class probability), ``margin`` (top-1 minus top-2) and
``entropy`` (nats; lower is surer), over the last axis of the named output, after a softmax when
the output holds logits. A request is confident when every row of its batch is; NaN is never sure.
Small float outputs (a classifier's few scores) take a plain-Python path with the same rules:
numpy's per-call overhead would cost more than the edge model itself (docs/architecture.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..protocol.routing import AgreementSpec, ConfidenceKind, ConfidenceSpec


class ConfidenceError(ValueError):
    """The edge outputs do not hold what the policy's confidence section names."""


@dataclass(frozen=True)
class Confidence:
    """The least sure row's score of one request, and whether the whole request is sure."""

    kind: ConfidenceKind
    value: float
    confident: bool


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable for large logits (float64)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def probabilities(output: np.ndarray, *, apply_softmax: bool) -> np.ndarray:
    """``output`` as rows of class probabilities, shape ``(rows, classes)``.

    Rank 0 or 1 is a batch of one; the first axis is the batch and the last the classes; any axes
    between are folded into rows (each position is judged). A single column is a binary output
    (a sigmoid probability, or a logit with ``apply_softmax``) and becomes ``[1 - p, p]``. Without
    ``apply_softmax`` rows are normalised to sum to 1 (negative scores count as 0)."""
    arr = np.asarray(output)
    if arr.dtype.kind not in "fiub":
        raise ConfidenceError(f"confidence output has dtype {arr.dtype}, not numbers")
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    elif arr.ndim == 1:
        arr = arr.reshape(1, -1)
    arr = arr.reshape(-1, arr.shape[-1]).astype(np.float64)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ConfidenceError(f"confidence output of shape {np.shape(output)} is empty")
    broken = ~np.isfinite(arr).all(axis=1, keepdims=True)  # NaN/Inf rows stay NaN: never sure
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if arr.shape[1] == 1:
            p = 1.0 / (1.0 + np.exp(-arr)) if apply_softmax else np.clip(arr, 0.0, 1.0)
            probs = np.concatenate([1.0 - p, p], axis=1)
        elif apply_softmax:
            probs = softmax(arr)
        else:
            arr = np.clip(arr, 0.0, None)
            total = arr.sum(axis=1, keepdims=True)
            probs = np.where(total > 0, arr / total, 1.0 / arr.shape[1])  # all zero: no idea, uniform
    return np.where(broken, np.nan, probs)


def row_scores(probs: np.ndarray, kind: ConfidenceKind) -> np.ndarray:
    """One score per row of ``probs`` (``(rows, classes)``)."""
    if kind is ConfidenceKind.max_prob:
        return probs.max(axis=1)
    if kind is ConfidenceKind.margin:
        top2 = np.sort(probs, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, -probs * np.log(probs), 0.0)
    return np.where(np.isnan(probs).any(axis=1), np.nan, terms.sum(axis=1))  # NaN is never sure


def is_confident(score: float, kind: ConfidenceKind, threshold: float) -> bool:
    """Whether one score clears the threshold (entropy: at most it; others: at least it)."""
    if not math.isfinite(score):
        return False
    return score <= threshold if kind is ConfidenceKind.entropy else score >= threshold


def confidence_output(outputs: Mapping[str, np.ndarray], spec: ConfidenceSpec) -> str:
    """The name of the output the confidence is read from (the first output when unnamed)."""
    if spec.output is None:
        if not outputs:
            raise ConfidenceError("the edge model returned no outputs")
        return next(iter(outputs))
    if spec.output not in outputs:
        raise ConfidenceError(f"the edge model has no output {spec.output!r} (it has {sorted(outputs)})")
    return spec.output


#: float outputs of at most this many elements are scored in plain Python (:func:`small_scores`)
SMALL_OUTPUT = 256


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -709.0 else 0.0  # exp(709+) overflows: p is 0


def _row_score(row: list[float], kind: ConfidenceKind, apply_softmax: bool) -> float:
    """One row's score by :func:`probabilities` and :func:`row_scores`' rules, on unnormalised
    weights divided by their total once (NaN for a row that is not finite)."""
    total = sum(row)
    if not math.isfinite(total) and not all(math.isfinite(v) for v in row):
        return math.nan
    if len(row) == 1:
        x = row[0]
        p = _sigmoid(x) if apply_softmax else min(max(x, 0.0), 1.0)
        weights, total = [1.0 - p, p], 1.0
    elif apply_softmax:
        top = max(row)
        weights = [math.exp(v - top) for v in row]
        total = sum(weights)
    else:
        weights = row if min(row) >= 0.0 else [v if v > 0.0 else 0.0 for v in row]
        total = sum(weights) if weights is not row else total
        if not total > 0.0:  # all zero: no idea, uniform
            weights, total = [1.0] * len(row), float(len(row))
    if kind is ConfidenceKind.max_prob:
        return max(weights) / total
    if kind is ConfidenceKind.margin:
        second, first = sorted(weights)[-2:]
        return (first - second) / total
    probs = (w / total for w in weights)
    return sum(-p * math.log(p) for p in probs if p > 0.0)  # a weight > 0 may still divide to 0


def small_scores(output: np.ndarray, kind: ConfidenceKind, apply_softmax: bool) -> list[float]:
    """``row_scores(probabilities(output))`` for a small float array, without numpy's per-call cost."""
    if output.size == 0:
        raise ConfidenceError(f"confidence output of shape {output.shape} is empty")
    arr = output.reshape(1, -1) if output.ndim < 2 else output.reshape(-1, output.shape[-1])
    return [_row_score(row, kind, apply_softmax) for row in arr.tolist()]


def read_confidence(outputs: Mapping[str, np.ndarray], spec: ConfidenceSpec) -> Confidence:
    """How sure the edge answer ``outputs`` is, per ``spec``; raises :class:`ConfidenceError`."""
    output = outputs[confidence_output(outputs, spec)]
    if isinstance(output, np.ndarray) and output.dtype.kind == "f" and output.size <= SMALL_OUTPUT:
        scores = small_scores(output, spec.kind, spec.softmax)
        if len(scores) == 1:
            worst = scores[0]
        elif any(math.isnan(v) for v in scores):
            worst = math.nan
        else:
            worst = max(scores) if spec.kind is ConfidenceKind.entropy else min(scores)
    else:
        array = row_scores(probabilities(output, apply_softmax=spec.softmax), spec.kind)
        if np.isnan(array).any():
            worst = math.nan
        else:
            worst = float(array.max() if spec.kind is ConfidenceKind.entropy else array.min())
    return Confidence(spec.kind, worst, is_confident(worst, spec.kind, spec.threshold))


def top1(output: np.ndarray, *, logits: bool = False) -> np.ndarray:
    """The predicted class per row: argmax over the class (last) axis; integer labels (no class
    axis) as they are; a single column as a binary answer (p >= 0.5, or logit >= 0)."""
    arr = np.asarray(output)
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    elif arr.ndim == 1:
        arr = arr.reshape(1, -1) if arr.dtype.kind in "fc" else arr.reshape(-1, 1)
    if arr.shape[-1] == 1:
        if arr.dtype.kind in "iub":
            return arr.reshape(-1)
        return (arr.reshape(-1) >= (0.0 if logits else 0.5)).astype(np.int64)
    return arr.reshape(-1, arr.shape[-1]).argmax(axis=1)


def answers_agree(
    edge: np.ndarray, cloud: np.ndarray, *, classifier: bool, tol: AgreementSpec, logits: bool = False
) -> bool:
    """Whether the edge and the cloud gave the same answer: the same top-1 class on every row for
    a classifier output, ``allclose`` within ``tol`` for a regressor. Different shapes never agree."""
    e, c = np.asarray(edge), np.asarray(cloud)
    if e.shape != c.shape:
        return False
    if classifier:
        return bool(np.array_equal(top1(e, logits=logits), top1(c, logits=logits)))
    if e.dtype.kind in "fc" or c.dtype.kind in "fc":
        return bool(np.allclose(e.astype(np.float64), c.astype(np.float64), rtol=tol.rtol, atol=tol.atol))
    return bool(np.array_equal(e, c))


def compare_answers(
    edge_out: Mapping[str, np.ndarray],
    cloud_out: Mapping[str, np.ndarray],
    spec: ConfidenceSpec | None,
    tol: AgreementSpec,
) -> bool | None:
    """Whether the edge's answer matches the cloud's on every output both gave (the confidence
    output as a classifier, the others as regressors); None when they share no output."""
    try:
        conf_name = confidence_output(edge_out, spec) if spec is not None else None
    except ConfidenceError:
        conf_name = None
    verdicts = [
        answers_agree(
            edge_out[name],
            arr,
            classifier=name == conf_name,
            tol=tol,
            logits=bool(spec and spec.softmax),
        )
        for name, arr in cloud_out.items()
        if name in edge_out
    ]
    return all(verdicts) if verdicts else None
