"""A real edge/cloud model pair on scikit-learn's bundled handwritten digits (no download).

The edge model is a tiny MLP (16 hidden units) on 4x4-pooled pixels, the pooling folded into its
first Gemm; the cloud model an MLP with 128 hidden units on all 64 pixels. Both are written with
``onnx.helper`` from the trained weights, take ``x`` (float32, ``[N, 64]``) and answer
``probabilities`` (``[N, 10]``), which a routing policy's ``confidence.output`` can name. Needs
scikit-learn (the ``dev`` extra).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from server.onnx_models import OPSET

INPUT = "x"
OUTPUT = "probabilities"
PIXELS = 64
CLASSES = 10
EDGE_HIDDEN = 16
CLOUD_HIDDEN = 128


@dataclass(frozen=True)
class DigitsPair:
    """The two model files and the held-out split (pixels scaled to [0, 1], labels 0-9)."""

    edge: Path
    cloud: Path
    x_val: np.ndarray
    y_val: np.ndarray


def pooling_matrix() -> np.ndarray:
    """``[64, 16]``: the mean of each 2x2 block of the 8x8 image, as one matrix product."""
    pool = np.zeros((PIXELS, 16), np.float64)
    for r in range(8):
        for c in range(8):
            pool[r * 8 + c, (r // 2) * 4 + c // 2] = 0.25
    return pool


def _write(path: Path, nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], name: str) -> Path:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", PIXELS])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def mlp_model(path: Path, clf: MLPClassifier, pool: np.ndarray | None = None) -> Path:
    """Softmax(relu(x @ W1 + b1) @ W2 + b2), the forward pass of a one-hidden-layer MLP; ``pool``
    (``[64, k]``) is folded into ``W1`` for a model trained on ``x @ pool``."""
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    if pool is not None:
        w1 = pool @ w1
    nodes = [
        helper.make_node("Gemm", [INPUT, "W1", "b1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [OUTPUT], axis=-1),
    ]
    return _write(path, nodes, {"W1": w1, "b1": b1, "W2": w2, "b2": b2}, path.stem)


def digits_split(*, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, x_val, y_train, y_val)``: 60 % / 40 % of the 1797 digits, stratified, pixels
    scaled to [0, 1] (float32), labels int64; the split every model of this module is trained on."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    return x_train, x_val, y_train, y_val


def build_digits_pair(out_dir: Path, *, seed: int = 0) -> DigitsPair:
    """Train both models on 60 % of the 1797 digits and write ``edge.onnx`` and ``cloud.onnx``
    under ``out_dir``; the other 40 % is the held-out split."""
    x_train, x_val, y_train, y_val = digits_split(seed=seed)
    pool = pooling_matrix()
    with warnings.catch_warnings():  # lbfgs stopping at max_iter is fine for a benchmark pair
        warnings.simplefilter("ignore", ConvergenceWarning)
        edge = MLPClassifier((EDGE_HIDDEN,), alpha=1.0, solver="lbfgs", max_iter=1000, random_state=seed)
        edge.fit(x_train @ pool, y_train)
        cloud = MLPClassifier((CLOUD_HIDDEN,), alpha=1e-2, solver="lbfgs", max_iter=500, random_state=seed)
        cloud.fit(x_train, y_train)
    return DigitsPair(
        mlp_model(out_dir / "edge.onnx", edge, pool), mlp_model(out_dir / "cloud.onnx", cloud), x_val, y_val
    )
