"""Reading uploaded ``.npz`` inputs (``read_calibration_inputs``, ``read_validation_inputs``):
members that are not arrays, and a model with a scalar input beside batched ones."""

from __future__ import annotations

import io
import re
import zipfile

import numpy as np
import pytest

from device_client.protocol.bundle import TensorSpec
from server.catalog.quantize import calibration_rows
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
        read_validation_inputs(path, [X])


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
