"""Loading an uploaded ONNX model and its validation vectors: the model's input/output signature,
generated or uploaded validation inputs, the reference outputs a device compares against, and the
push's metadata. Pure helpers: no database.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from device_client.protocol.bundle import ORT_DTYPES, TensorSpec, ValidationSpec
from server.catalog.quantize import batched_inputs
from server.catalog.schemas import VersionMetadata
from server.errors import Invalid

VALIDATION_SEED = 20240601
MAX_VALIDATION_ELEMENTS = 16 * 1024 * 1024


@dataclass(frozen=True)
class LoadedModel:
    """An uploaded model loaded by onnxruntime, with its signature."""

    session: Any  # onnxruntime.InferenceSession
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def _spec(arg: Any, what: str) -> TensorSpec:
    dtype = ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise Invalid(f"{what} {arg.name!r} has unsupported type {arg.type}; only numeric tensors")
    shape = [d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None) for d in arg.shape]
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)


def load_onnx(path: Path) -> LoadedModel:
    """Load ``path`` with onnxruntime (CPU, one thread); :class:`Invalid` if it is not a model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.load_model_format", "ONNX")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise Invalid(f"the uploaded file is not a loadable ONNX model: {first}") from None
    inputs = [_spec(a, "input") for a in session.get_inputs()]
    outputs = [_spec(a, "output") for a in session.get_outputs()]
    if not inputs or not outputs:
        raise Invalid("the model must have at least one input and one output")
    return LoadedModel(session=session, inputs=inputs, outputs=outputs)


def generate_inputs(inputs: Sequence[TensorSpec], seed: int = VALIDATION_SEED) -> dict[str, np.ndarray]:
    """Deterministic validation inputs for a signature: dynamic dims -> 1, floats in [0, 1)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
        if int(np.prod(shape, dtype=np.int64)) > MAX_VALIDATION_ELEMENTS:
            raise Invalid(f"input {spec.name!r} is too large to generate validation data; upload some")
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.random(shape, dtype=np.float64).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
    return feeds


def load_npz(path: Path, what: str, max_bytes: int) -> dict[str, np.ndarray]:
    """Every member of an uploaded ``.npz`` (a ``what`` file), at most ``max_bytes`` once
    decompressed (checked before loading anything); :class:`Invalid` if it is no readable zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            unpacked = sum(info.file_size for info in zf.infolist())
        if unpacked > max_bytes:
            raise Invalid(f"{what} .npz holds {unpacked} bytes unpacked, over the limit of {max_bytes}")
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise Invalid(f"{what} file is not a readable .npz: {exc}") from None


def read_validation_inputs(
    path: Path, inputs: Sequence[TensorSpec], max_bytes: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The ``inputs/<name>`` arrays (and any ``outputs/<name>``) of an uploaded ``.npz``, at most
    ``max_bytes`` once decompressed (:func:`load_npz`)."""
    arrays = load_npz(path, "validation", max_bytes)
    wanted = {f"inputs/{s.name}" for s in inputs}
    unexpected = [k for k in arrays if k not in wanted and not k.startswith("outputs/")]
    if unexpected:
        raise Invalid(f"validation .npz has unexpected keys {sorted(unexpected)}; use inputs/<name>")
    feeds = {spec.name: _input_array(arrays, spec, "validation") for spec in inputs}
    expected = {k.removeprefix("outputs/"): v for k, v in arrays.items() if k.startswith("outputs/")}
    return feeds, expected


def _input_array(arrays: dict[str, np.ndarray], spec: TensorSpec, what: str) -> np.ndarray:
    """``inputs/<name>`` of an uploaded ``.npz``, checked against the model's input ``spec``:
    the same dtype, rank and every fixed dimension."""
    arr = arrays.get(f"inputs/{spec.name}")
    if arr is None:
        raise Invalid(f"{what} .npz lacks inputs/{spec.name}")
    if not isinstance(arr, np.ndarray):  # a member that is no .npy: np.load hands back its bytes
        raise Invalid(f"{what} input {spec.name!r} is not a .npy array")
    if arr.dtype != np.dtype(spec.dtype):
        raise Invalid(f"{what} input {spec.name!r} is {arr.dtype}, the model expects {spec.dtype}")
    if arr.ndim != len(spec.shape) or any(
        isinstance(d, int) and d != n for d, n in zip(spec.shape, arr.shape, strict=True)
    ):
        raise Invalid(f"{what} input {spec.name!r} has shape {list(arr.shape)}, expected {spec.shape}")
    return arr


def read_calibration_inputs(
    path: Path, inputs: Sequence[TensorSpec], max_bytes: int
) -> dict[str, np.ndarray]:
    """The ``inputs/<name>`` arrays of an uploaded calibration ``.npz`` (static int8 calibration),
    one per model input and nothing else, with as many rows (first dimension, at least one) each
    of those whose first dimension is symbolic (:func:`~server.catalog.quantize.batched_inputs`),
    at most ``max_bytes`` once decompressed (:func:`load_npz`)."""
    arrays = load_npz(path, "calibration", max_bytes)
    wanted = {f"inputs/{s.name}" for s in inputs}
    unexpected = sorted(k for k in arrays if k not in wanted)
    if unexpected:
        raise Invalid(
            f"calibration .npz has unexpected keys {unexpected}; use inputs/<name> of the model's inputs"
        )
    feeds = {spec.name: _input_array(arrays, spec, "calibration") for spec in inputs}
    # a scalar input or one of a fixed first dimension is fed whole with every row: no row count
    batched = batched_inputs(inputs)
    rows = {name: len(arr) for name, arr in feeds.items() if name in batched}
    if len(set(rows.values())) > 1:
        raise Invalid(f"calibration inputs have different numbers of rows: {rows}")
    if 0 in rows.values():
        raise Invalid("calibration .npz has no rows")
    return feeds


def run_validation(
    model: LoadedModel,
    feeds: dict[str, np.ndarray],
    spec: ValidationSpec,
    expected: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Run the model on ``feeds``; outputs by name. Checks finiteness and any expected outputs."""
    try:
        values = model.session.run(None, feeds)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise Invalid(f"the model fails on its validation inputs: {first}") from None
    outputs = {o.name: np.asarray(v) for o, v in zip(model.outputs, values, strict=True)}
    for name, arr in outputs.items():
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise Invalid(f"output {name!r} is not finite on the validation inputs")
    for name, want in (expected or {}).items():
        if name not in outputs:
            raise Invalid(f"validation .npz has outputs/{name}, but the model has no output {name!r}")
        got = outputs[name]
        same_shape = got.shape == want.shape
        if not same_shape or not np.allclose(got, want, rtol=spec.rtol, atol=spec.atol):
            raise Invalid(
                f"output {name!r} differs from the uploaded outputs/{name} beyond rtol={spec.rtol}, "
                f"atol={spec.atol}"
            )
    return outputs


def write_validation(path: Path, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    arrays = {f"inputs/{k}": v for k, v in feeds.items()} | {f"outputs/{k}": v for k, v in outputs.items()}
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]  # no key is savez's allow_pickle


def parse_metadata(text: str | None) -> VersionMetadata:
    if not text:
        return VersionMetadata()
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise Invalid(f"metadata is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise Invalid("metadata must be a JSON object")
    try:
        return VersionMetadata.model_validate(raw)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'metadata'}: {e['msg']}" for e in exc.errors()
        )
        raise Invalid(f"invalid metadata: {errors}") from None
