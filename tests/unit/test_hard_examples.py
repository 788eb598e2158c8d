"""Packing hard examples: any tensor name round-trips (even savez's own argument names), and an
export of examples whose shapes differ is refused with a message rather than a crash."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import numpy as np
import pytest

from server.errors import Invalid
from server.examples.repository import pack, unpack
from server.examples.service import to_npz
from server.examples.tables import HardExample


def test_any_tensor_name_round_trips():
    tensors = {"file": np.ones((1, 2), np.float32), "allow_pickle": np.arange(3), "a/b": np.zeros(1)}
    back = unpack(pack(tensors))
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value)


def _row(x: np.ndarray) -> HardExample:
    ins, outs = pack({"x": x}), pack({"y": x[:, :1]})
    return HardExample(
        model="m", version="1", device_id="d", created_at=datetime.now(UTC),
        size_bytes=len(ins) + len(outs), inputs=ins, outputs=outs,
    )  # fmt: skip


def test_examples_of_different_shapes_are_refused_with_a_message():
    with pytest.raises(Invalid, match="changed shape"):
        to_npz([_row(np.zeros((1, 4), np.float32)), _row(np.zeros((1, 5), np.float32))])


def test_an_empty_export_is_a_valid_npz():
    with np.load(io.BytesIO(to_npz([])), allow_pickle=False) as npz:
        assert len(npz["device_ids"]) == 0
