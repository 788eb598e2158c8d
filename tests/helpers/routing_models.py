"""Real ONNX models for routing tests: classifiers that are sure or unsure depending on the input,
and an edge/cloud pair for split inference (the edge computes an embedding, the cloud a head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.onnx_models import OPSET, make_model


def classifier(path: Path, *, seed: int = 0, in_dim: int = 4, classes: int = 3, scale: float = 4.0) -> Path:
    """``logits = x @ W * scale`` (input ``x`` [N, in_dim], output ``logits`` [N, classes]): x = 0 gives
    equal logits (unsure), a large x gives one dominant class (sure)."""
    return make_model(path, in_dim=in_dim, out_dim=classes, scale=scale, seed=seed, output_name="logits")


def logits_of(
    x: np.ndarray, *, seed: int = 0, in_dim: int = 4, classes: int = 3, scale: float = 4.0
) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((in_dim, classes)).astype(np.float32)
    return (x @ w) * np.float32(scale)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def split_pair(
    directory: Path,
    *,
    in_dim: int = 4,
    emb_dim: int = 5,
    classes: int = 3,
    seed: int = 0,
    cloud_seed: int | None = None,
) -> tuple[Path, Path]:
    """(edge, cloud head): the edge maps ``x`` to ``emb`` = x @ A and ``logits`` = emb @ B; the
    cloud head maps its input ``features`` (the embedding) to ``probs`` = softmax(features @ B'),
    with B' = B unless ``cloud_seed`` draws another."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((in_dim, emb_dim)).astype(np.float32)
    b = rng.standard_normal((emb_dim, classes)).astype(np.float32)
    b_cloud = (
        b
        if cloud_seed is None
        else np.random.default_rng(cloud_seed).standard_normal((emb_dim, classes)).astype(np.float32)
    )
    edge = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "A"], ["emb"]),
            helper.make_node("MatMul", ["emb", "B"], ["logits"]),
        ],
        "edge_split",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_dim])],
        [
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", emb_dim]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
        ],
        initializer=[numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")],
    )
    cloud = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "B"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
        ],
        "cloud_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", emb_dim])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(b_cloud, "B")],
    )
    return _save(edge, directory / "edge_split.onnx"), _save(cloud, directory / "cloud_head.onnx")


def typed_echo(path: Path) -> Path:
    """A model with one input per OIP datatype the tests round-trip, each echoed (Identity) to an
    output ``<name>_out``: f32, f64, i32, i64, u8, b (bool), f16."""
    types = {
        "f32": TensorProto.FLOAT,
        "f64": TensorProto.DOUBLE,
        "i32": TensorProto.INT32,
        "i64": TensorProto.INT64,
        "u8": TensorProto.UINT8,
        "b": TensorProto.BOOL,
        "f16": TensorProto.FLOAT16,
    }
    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [f"{n}_out"]) for n in types],
        "typed_echo",
        [helper.make_tensor_value_info(n, t, ["N", 2]) for n, t in types.items()],
        [helper.make_tensor_value_info(f"{n}_out", t, ["N", 2]) for n, t in types.items()],
    )
    return _save(graph, path)
