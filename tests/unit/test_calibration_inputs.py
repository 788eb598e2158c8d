"""Reading uploaded ``.npz`` inputs (``read_calibration_inputs``, ``read_validation_inputs``):
members that are not arrays, and models with a scalar input or one of a fixed first dimension
beside batched ones, which a static calibration feeds whole with every row."""

from __future__ import annotations

import io
import re
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_client.protocol.bundle import TensorSpec
from server.catalog.quantize import Calibration, batched_inputs, calibration_rows, quantize_int8
from server.catalog.validation import read_calibration_inputs, read_validation_inputs
from server.errors import Invalid

X = TensorSpec(name="x", dtype="float32", shape=["batch", 3])
LIMIT = 1 << 20


def not_an_array(path):
    """A zip holding ``inputs/x`` as raw bytes, not a ``.npy`` (``np.load`` hands them back as bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("inputs/x", b"\x00" * 12)
    path.write_bytes(buf.getvalue())
    return path


def test_a_member_that_is_not_an_array_is_invalid(tmp_path):
    path = not_an_array(tmp_path / "c.npz")
    with pytest.raises(Invalid, match=re.escape("calibration input 'x' is not a .npy array")):
        read_calibration_inputs(path, [X], LIMIT)
    with pytest.raises(Invalid, match=re.escape("validation input 'x' is not a .npy array")):
        read_validation_inputs(path, [X], LIMIT)


SCALE = TensorSpec(name="scale", dtype="float32", shape=[])


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_a_scalar_input_beside_batched_rows_is_no_row_count(tmp_path):
    rows = np.zeros((5, 3), np.float32)
    path = write_npz(tmp_path / "c.npz", **{"inputs/x": rows, "inputs/scale": np.float32(2.0)})
    feeds = read_calibration_inputs(path, [X, SCALE], LIMIT)
    assert feeds["scale"].shape == ()
    assert feeds["x"].shape == (5, 3)
    assert calibration_rows(feeds) == 5


def test_batched_inputs_must_still_agree_on_rows(tmp_path):
    y = TensorSpec(name="y", dtype="float32", shape=["batch", 3])
    arrays = {"inputs/x": np.zeros((5, 3), np.float32), "inputs/y": np.zeros((4, 3), np.float32)}
    path = write_npz(tmp_path / "c.npz", **arrays, **{"inputs/scale": np.float32(1.0)})
    with pytest.raises(Invalid, match=re.escape("different numbers of rows: {'x': 5, 'y': 4}")):
        read_calibration_inputs(path, [X, y, SCALE], LIMIT)


FIXED = TensorSpec(name="bias", dtype="float32", shape=[2])


def test_an_input_of_a_fixed_first_dimension_is_no_row_count(tmp_path):
    rows = np.zeros((5, 3), np.float32)
    path = write_npz(tmp_path / "c.npz", **{"inputs/x": rows, "inputs/bias": np.zeros(2, np.float32)})
    feeds = read_calibration_inputs(path, [X, FIXED], LIMIT)
    assert calibration_rows(feeds, batched_inputs([X, FIXED])) == 5


def fixed_batch_model(path):
    """``y = x @ w`` with ``x`` of the fixed shape ``[2, 3]``: no batch dimension to cut in rows."""
    w = numpy_helper.from_array(np.random.default_rng(0).random((3, 4), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_static_calibration_feeds_a_fixed_first_dimension_whole(tmp_path):
    src = fixed_batch_model(tmp_path / "m.onnx")
    spec = TensorSpec(name="x", dtype="float32", shape=[2, 3])
    feeds = {"x": np.random.default_rng(1).random((2, 3), dtype=np.float32)}
    quantize_int8(src, tmp_path / "q.onnx", Calibration.static, feeds, batched=batched_inputs([spec]))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "QuantizeLinear" in ops


def test_a_validation_file_is_held_to_the_unpacked_limit_too(tmp_path):
    """8 MiB of zeros, a few KB compressed: not unpacked into memory beyond the limit."""
    path = tmp_path / "v.npz"
    np.savez_compressed(path, **{"inputs/x": np.zeros((1 << 19, 4), np.float32)})
    assert path.stat().st_size < 64 * 1024
    with pytest.raises(Invalid, match=r"validation \.npz holds 8388[0-9]+ bytes unpacked, over the limit"):
        read_validation_inputs(path, [TensorSpec(name="x", dtype="float32", shape=["n", 4])], LIMIT)


def test_a_bare_npy_is_not_a_readable_npz(tmp_path):
    path = tmp_path / "v.npz"
    np.save(path.with_suffix(""), np.zeros((2, 3), np.float32))  # writes v.npy
    path.with_suffix(".npy").rename(path)
    with pytest.raises(Invalid, match=re.escape("validation file is not a readable .npz")):
        read_validation_inputs(path, [X], LIMIT)
