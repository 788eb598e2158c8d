"""Build small, real ONNX models with chosen shapes and behaviour (``onnx.helper``).

Used by ``fleet demo`` (its v1/v2/v3 models) and by the tests. Needs the ``onnx`` package (in the
``server`` and ``dev`` extras).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_model(
    path: Path,
    *,
    in_dim: int = 4,
    out_dim: int = 3,
    scale: float = 1.0,
    bias: float = 0.0,
    seed: int = 0,
    slow_factor: int = 0,
    nan_on_negative: bool = False,
    input_name: str = "x",
    output_name: str = "y",
    batch: int | str = "N",
) -> Path:
    """Write a model computing ``y = x @ W * scale + bias`` (``W`` deterministic from ``seed``).

    ``slow_factor=k`` adds k chained 256x256 MatMuls folded into the output as ``+0*...``: slower,
    same answer. ``nan_on_negative=True`` adds ``0 * sqrt(x)``, so a negative input yields NaN (an
    inference error on the device: the bad model in the field) while validation inputs in [0, 1)
    pass.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((in_dim, out_dim)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.array([scale], np.float32), "scale"),
        numpy_helper.from_array(np.array([bias], np.float32), "bias"),
        numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("MatMul", [input_name, "W"], ["xw"]),
        helper.make_node("Mul", ["xw", "scale"], ["xws"]),
        helper.make_node("Add", ["xws", "bias"], ["base"]),
    ]
    last = "base"
    if slow_factor > 0:
        m = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
        inits.append(numpy_helper.from_array(m, "M"))
        # the chain depends on the input, so onnxruntime cannot constant-fold it away
        nodes += [
            helper.make_node("ReduceSum", [input_name], ["x_sum"], keepdims=0),
            helper.make_node("Mul", ["M", "x_sum"], ["M_x"]),
        ]
        prev = "M_x"
        for i in range(slow_factor):
            nodes.append(helper.make_node("MatMul", [prev, "M"], [f"slow{i}"]))
            prev = f"slow{i}"
        nodes += [
            helper.make_node("ReduceSum", [prev], ["slow_sum"], keepdims=0),
            helper.make_node("Mul", ["slow_sum", "zero"], ["slow_zero"]),
            helper.make_node("Add", [last, "slow_zero"], ["with_slow"]),
        ]
        last = "with_slow"
    if nan_on_negative:
        nodes += [
            helper.make_node("Sqrt", [input_name], ["sq"]),
            helper.make_node("MatMul", ["sq", "W"], ["sqw"]),
            helper.make_node("Mul", ["sqw", "zero"], ["sq_zero"]),
            helper.make_node("Add", [last, "sq_zero"], ["with_nan"]),
        ]
        last = "with_nan"
    nodes.append(helper.make_node("Identity", [last], [output_name]))
    graph = helper.make_graph(
        nodes,
        "fleetota_test_model",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, in_dim])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, out_dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def reference_output(
    x: np.ndarray, *, in_dim: int = 4, out_dim: int = 3, scale: float = 1.0, bias: float = 0.0, seed: int = 0
) -> np.ndarray:
    """What ``make_model`` with the same arguments computes, in numpy."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((in_dim, out_dim)).astype(np.float32)
    return (x @ w) * np.float32(scale) + np.float32(bias)
