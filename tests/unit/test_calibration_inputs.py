"""Reading uploaded ``.npz`` inputs (``read_calibration_inputs``, ``read_validation_inputs``):
members that are not arrays, and a model with a scalar input beside batched ones."""

from __future__ import annotations

import io
import re
import zipfile

import pytest

from device_client.protocol.bundle import TensorSpec
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
