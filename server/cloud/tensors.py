"""Open Inference Protocol (KServe V2) tensors: parse an infer request, encode its response.

Pure: bytes in, numpy arrays out, and back. JSON tensors carry ``name``, ``shape``, ``datatype``
and ``data`` (row-major, flat or nested); the binary tensor data extension (Triton's: a JSON header
of ``Inference-Header-Content-Length`` bytes followed by raw little-endian tensors, each input
naming its ``binary_data_size``) is understood too, because that is what ``tritonclient`` sends by
default. Every problem is a :class:`~server.cloud.errors.BadRequest` naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from server.cloud.errors import BadRequest

#: OIP datatypes of the element types onnxruntime models use (numpy dtype names)
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_BY_DTYPE = {np.dtype(v): k for k, v in DATATYPES.items()}
#: what JSON data may hold for each kind of element: numpy's inferred kinds
_ACCEPTED_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
_KIND_NAMES = {"b": "booleans", "i": "integers", "f": "non-integer numbers", "U": "strings"}
MAX_TENSORS = 64
MAX_RANK = 16


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A parsed request: inputs by name (with the datatype each declared), the outputs asked for
    (None: all of them, JSON unless ``binary_outputs``)."""

    id: str | None
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: tuple[RequestedOutput, ...] | None
    binary_outputs: bool
    #: ``fleet_collect: true``: the caller's signed policy lets the cloud keep it as a hard example
    collect: bool = False


def datatype_of(dtype: np.dtype[Any] | str) -> str:
    """The OIP datatype of a numpy dtype (``float32`` -> ``FP32``)."""
    try:
        return _BY_DTYPE[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise BadRequest(f"element type {dtype} has no Open Inference Protocol datatype here") from None


def metadata_shape(shape: Sequence[int | str | None]) -> list[int]:
    """A TensorSpec shape as OIP metadata writes it: dynamic dimensions are ``-1``."""
    return [d if isinstance(d, int) else -1 for d in shape]


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_RANK:
        raise BadRequest(f"input {name!r}: shape must be a list of at most {MAX_RANK} integers")
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise BadRequest(f"input {name!r}: shape {value} must hold non-negative integers")
    return tuple(value)


def _parameters(item: dict[str, Any], what: str) -> dict[str, Any]:
    params = item.get("parameters", {})
    if params is None:
        return {}
    return _obj(params, f"{what} parameters")


def _from_json(data: Any, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype = np.dtype(DATATYPES[datatype])
    if not isinstance(data, list):
        data = [data]
    try:
        raw = np.array(data)
    except (ValueError, TypeError):
        raise BadRequest(f"input {name!r}: data is not a rectangular array of numbers") from None
    count = math.prod(shape)
    if raw.size == 0 and count == 0:
        return np.zeros(shape, dtype)
    if raw.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
        kind = _KIND_NAMES.get(raw.dtype.kind, "values")
        raise BadRequest(f"input {name!r}: datatype {datatype} cannot hold {kind}")
    if raw.ndim > 1 and raw.shape != shape:
        raise BadRequest(
            f"input {name!r}: data of shape {list(raw.shape)} does not match shape {list(shape)}"
        )
    if raw.size != count:
        raise BadRequest(f"input {name!r}: {raw.size} elements do not fill shape {list(shape)} ({count})")
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise BadRequest(f"input {name!r}: values outside the range of {datatype}")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = raw.astype(dtype).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(arr).all():
        raise BadRequest(f"input {name!r}: values outside the range of {datatype}")
    return arr


def _from_binary(chunk: bytes, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(chunk) != math.prod(shape) * dtype.itemsize:
        raise BadRequest(
            f"input {name!r}: {len(chunk)} binary bytes do not fill shape {list(shape)} of {datatype}"
        )
    arr = np.frombuffer(chunk, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and arr.size and np.frombuffer(chunk, np.uint8).max() > 1:
        raise BadRequest(f"input {name!r}: BOOL bytes must be 0 or 1")
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def parse_infer_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an infer request body; ``header_length`` is the ``Inference-Header-Content-Length``
    header (the binary extension), None for a pure JSON body."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise BadRequest(
            f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes"
        )
    head, binary = (body, b"") if header_length is None else (body[:header_length], body[header_length:])
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request is not valid JSON: {exc}") from None
    doc = _obj(doc, "the request")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("id must be a string")
    request_params = _parameters(doc, "request")
    binary_outputs = request_params.get("binary_data_output") is True
    items = doc.get("inputs")
    if not isinstance(items, list) or not items or len(items) > MAX_TENSORS:
        raise BadRequest(f"inputs must be a list of 1 to {MAX_TENSORS} tensors")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for raw_item in items:
        item = _obj(raw_item, "each input")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("every input needs a name")
        if name in inputs:
            raise BadRequest(f"input {name!r} is given twice")
        datatype = item.get("datatype")
        if datatype not in DATATYPES:
            raise BadRequest(
                f"input {name!r}: datatype {datatype!r} is not supported (one of {', '.join(DATATYPES)})"
            )
        shape = _shape(item.get("shape"), name)
        size = _parameters(item, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"input {name!r}: binary_data_size {size!r} does not fit the binary data")
            if "data" in item:
                raise BadRequest(f"input {name!r}: both data and binary_data_size are given")
            inputs[name] = _from_binary(binary[offset : offset + size], name, datatype, shape)
            offset += size
        elif "data" in item:
            inputs[name] = _from_json(item["data"], name, datatype, shape)
        else:
            raise BadRequest(f"input {name!r} has no data")
        datatypes[name] = datatype
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list) or len(doc["outputs"]) > MAX_TENSORS:
            raise BadRequest(f"outputs must be a list of at most {MAX_TENSORS} outputs")
        wanted = []
        for raw_out in doc["outputs"]:
            out = _obj(raw_out, "each requested output")
            if not isinstance(out.get("name"), str):
                raise BadRequest("every requested output needs a name")
            binary_out = _parameters(out, f"output {out['name']!r}").get("binary_data", binary_outputs)
            wanted.append(RequestedOutput(out["name"], binary_out is True))
        outputs = tuple(wanted)
    collect = request_params.get("fleet_collect") is True
    return InferRequest(request_id, inputs, datatypes, outputs, binary_outputs, collect)


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray],
    requested: tuple[RequestedOutput, ...] | None,
    binary_outputs: bool = False,
) -> tuple[bytes, int | None]:
    """The response body and, when some output travels as binary, the length of its JSON header
    (the ``Inference-Header-Content-Length`` to send)."""
    wanted = requested or tuple(RequestedOutput(name, binary_outputs) for name in outputs)
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in wanted:
        arr = np.ascontiguousarray(outputs[out.name])
        tensor: dict[str, Any] = {
            "name": out.name,
            "datatype": datatype_of(arr.dtype),
            "shape": list(arr.shape),
        }
        if out.binary:
            data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            tensor["data"] = arr.reshape(-1)
        tensors.append(tensor)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": tensors}
    if request_id is not None:
        doc["id"] = request_id
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)
