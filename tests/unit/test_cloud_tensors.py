"""The Open Inference Protocol tensor codec (pure): every datatype in and out, JSON and binary."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from server.cloud.errors import BadRequest
from server.cloud.tensors import (
    DATATYPES,
    RequestedOutput,
    datatype_of,
    encode_infer_response,
    metadata_shape,
    parse_infer_request,
)


def _request(datatype: str, shape: list[int], data, **extra) -> bytes:
    return orjson.dumps(
        {"inputs": [{"name": "a", "shape": shape, "datatype": datatype, "data": data}], **extra}
    )


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips_as_json_and_binary(datatype):
    dtype = np.dtype(DATATYPES[datatype])
    values = np.array([[0, 1, 1], [1, 0, 1]], dtype=dtype)
    parsed = parse_infer_request(_request(datatype, [2, 3], values.ravel().tolist()))
    assert parsed.inputs["a"].dtype == dtype
    np.testing.assert_array_equal(parsed.inputs["a"], values)
    assert parsed.datatypes == {"a": datatype}

    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "a",
                    "shape": [2, 3],
                    "datatype": datatype,
                    "parameters": {"binary_data_size": 6 * dtype.itemsize},
                }
            ]
        }
    )
    raw = values.astype(dtype.newbyteorder("<")).tobytes()
    binary = parse_infer_request(head + raw, len(head))
    np.testing.assert_array_equal(binary.inputs["a"], values)
    assert binary.inputs["a"].dtype == dtype

    body, header = encode_infer_response("m", "1.0.0", None, {"b": values}, None)
    assert header is None
    (out,) = orjson.loads(body)["outputs"]
    assert (out["datatype"], out["shape"]) == (datatype, [2, 3])
    np.testing.assert_array_equal(np.array(out["data"], dtype).reshape(2, 3), values)

    body, header = encode_infer_response("m", "1.0.0", "r", {"b": values}, (RequestedOutput("b", True),))
    meta = orjson.loads(body[:header])
    assert meta["id"] == "r"
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": values.nbytes}
    np.testing.assert_array_equal(np.frombuffer(body[header:], dtype.newbyteorder("<")).reshape(2, 3), values)


def test_nested_and_flat_data_and_float_precision():
    x = np.array([[0.1, 0.2], [0.3, 1e-30]], np.float32)
    flat = parse_infer_request(_request("FP32", [2, 2], x.ravel().tolist())).inputs["a"]
    nested = parse_infer_request(_request("FP32", [2, 2], x.tolist())).inputs["a"]
    np.testing.assert_array_equal(flat, x)
    np.testing.assert_array_equal(nested, x)
    # integers are numbers too
    np.testing.assert_array_equal(parse_infer_request(_request("FP64", [2], [1, 2])).inputs["a"], [1.0, 2.0])
    # an FP32 output read back as FP32 is bit-identical
    body, _ = encode_infer_response("m", "1", None, {"b": x}, None)
    np.testing.assert_array_equal(
        np.array(orjson.loads(body)["outputs"][0]["data"], np.float32).reshape(2, 2), x
    )


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (_request("INT8", [2], [1, 200]), None, "outside the range of INT8"),
        (_request("UINT8", [2], [1, -1]), None, "outside the range of UINT8"),
        # orjson reads an integer beyond 64 bits as a float
        (
            b'{"inputs": [{"name": "a", "shape": [1], "datatype": "UINT64",'
            b' "data": [1180591620717411303424]}]}',
            None,
            "cannot hold non-integer numbers",
        ),
        (_request("FP16", [1], [1e6]), None, "outside the range of FP16"),
        (_request("INT32", [2], [1, 2.5]), None, "cannot hold non-integer numbers"),
        (_request("BOOL", [2], [True, 1]), None, "cannot hold integers"),
        (_request("FP32", [2], [True, False]), None, "cannot hold booleans"),
        (_request("BYTES", [1], ["a"]), None, "not supported"),
        (_request("FP32", [2, 2], [[1, 2, 3], [4]]), None, "rectangular"),
        (_request("FP32", [2, 2], [[1, 2], [3, 4], [5, 6]]), None, "does not match shape"),
        (_request("FP32", [True, 2], [1, 2]), None, "non-negative integers"),
        (_request("FP32", [1] * 17, [1]), None, "at most 16"),
        (
            orjson.dumps({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}] * 2}),
            None,
            "twice",
        ),
        (orjson.dumps({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}), None, "needs a name"),
        (orjson.dumps({"inputs": "x"}), None, "inputs must be a list"),
        (_request("FP32", [1], [1], outputs="y"), None, "outputs must be a list"),
        (_request("FP32", [1], [1], outputs=[{"nom": "y"}]), None, "needs a name"),
        (_request("FP32", [1], [1], parameters=[]), None, "parameters must be a JSON object"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b'{"inputs": [1e999]}', None, "not valid JSON"),
        (_request("FP32", [1], [1]), 10_000, "does not fit a body"),
        (_request("FP32", [1], [1]) + b"xx", None, "not valid JSON"),
    ],
)
def test_bad_requests_name_the_problem(body, header, message):
    with pytest.raises(BadRequest, match=message.replace("(", r"\(")):
        parse_infer_request(body, header)


def test_binary_sizes_must_add_up():
    head = orjson.dumps(
        {"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}
    )
    with pytest.raises(BadRequest, match="does not fit the binary data"):
        parse_infer_request(head + b"\0" * 4, len(head))
    with pytest.raises(BadRequest, match="belong to no input"):
        parse_infer_request(head + b"\0" * 12, len(head))
    wrong = orjson.dumps(
        {"inputs": [{"name": "a", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}
    )
    with pytest.raises(BadRequest, match="do not fill shape"):
        parse_infer_request(wrong + b"\0" * 8, len(wrong))
    flags = orjson.dumps(
        {"inputs": [{"name": "a", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}]}
    )
    with pytest.raises(BadRequest, match="0 or 1"):
        parse_infer_request(flags + b"\x01\x02", len(flags))


def test_requested_outputs_and_binary_default():
    body = _request(
        "FP32", [1], [1], outputs=[{"name": "y"}, {"name": "z", "parameters": {"binary_data": True}}]
    )
    parsed = parse_infer_request(body)
    assert parsed.outputs == (RequestedOutput("y", False), RequestedOutput("z", True))
    parsed = parse_infer_request(_request("FP32", [1], [1], parameters={"binary_data_output": True}))
    assert parsed.outputs is None
    assert parsed.binary_outputs


def test_metadata_helpers():
    assert metadata_shape(["N", 4, None]) == [-1, 4, -1]
    assert datatype_of("float16") == "FP16"
    with pytest.raises(BadRequest):
        datatype_of("complex64")
