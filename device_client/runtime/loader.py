"""Loading a model slot (:func:`load_slot`): a new onnxruntime session whose signature, validation
vectors and warm-up must all pass before it may serve (:class:`LoadedModel`); any failure raises
:class:`ModelRejected`."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from ..protocol.bundle import (
    MANIFEST_MEMBER,
    MODEL_MEMBER,
    ORT_DTYPES,
    VALIDATION_MEMBER,
    BundleManifest,
    TensorSpec,
)

log = logging.getLogger(__name__)


class ModelRejected(Exception):
    """A model failed to load, its signature or its validation vectors; it never serves."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadInput(ValueError):
    """A request's inputs do not fit the serving model's signature."""


@dataclass(frozen=True)
class _InputCheck:
    name: str
    dtype: np.dtype[Any]
    ndim: int
    fixed: tuple[tuple[int, int], ...]  # (axis, size) of every fixed dimension


@dataclass(frozen=True)
class LoadedModel:
    """A validated, warmed session and its manifest. Immutable: swapped as a whole."""

    manifest: BundleManifest
    session: ort.InferenceSession
    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    checks: tuple[_InputCheck, ...]
    load_ms: float

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def input_spec(self, name: str) -> TensorSpec:
        for spec in self.manifest.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Raise :class:`BadInput` unless ``inputs`` has exactly the model's inputs, well typed."""
        if len(inputs) != len(self.checks):
            raise BadInput(f"expected inputs {list(self.input_names)}, got {sorted(inputs)}")
        for c in self.checks:
            arr = inputs.get(c.name)
            if arr is None:
                raise BadInput(f"missing input {c.name!r}; expected {list(self.input_names)}")
            if not isinstance(arr, np.ndarray):
                raise BadInput(f"input {c.name!r} is not a numpy array")
            if arr.dtype != c.dtype:
                raise BadInput(f"input {c.name!r} has dtype {arr.dtype}, expected {c.dtype}")
            if arr.ndim != c.ndim:
                raise BadInput(f"input {c.name!r} has rank {arr.ndim}, expected {c.ndim}")
            for axis, size in c.fixed:
                if arr.shape[axis] != size:
                    raise BadInput(f"input {c.name!r} has shape {arr.shape}; axis {axis} must be {size}")

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(self.output_names), dict(inputs))


def all_finite(outputs: Sequence[np.ndarray]) -> bool:
    for out in outputs:  # noqa: SIM110  (a plain loop is cheaper than all() on the request path)
        if out.dtype.kind in "fc" and not np.isfinite(out).all():
            return False
    return True


def _check_signature(kind: str, specs: list[TensorSpec], args: list[Any]) -> None:
    expected = [s.name for s in specs]
    actual = [a.name for a in args]
    if sorted(expected) != sorted(actual):
        raise ModelRejected(f"{kind} names {actual} differ from bundle.json {expected}")
    by_name = {a.name: a for a in args}
    for spec in specs:
        arg = by_name[spec.name]
        try:
            want = np.dtype(spec.dtype)
        except TypeError:
            raise ModelRejected(f"bundle.json {kind} {spec.name!r}: unknown dtype {spec.dtype!r}") from None
        have = ORT_DTYPES.get(arg.type)
        if have is None or np.dtype(have) != want:
            raise ModelRejected(f"{kind} {spec.name!r} is {arg.type}, bundle.json says {spec.dtype}")
        shape = list(arg.shape)
        if len(shape) != len(spec.shape):
            raise ModelRejected(
                f"{kind} {spec.name!r} has rank {len(shape)}, bundle.json says {len(spec.shape)}"
            )
        for axis, (got, size) in enumerate(zip(shape, spec.shape, strict=True)):
            if isinstance(got, int) and isinstance(size, int) and got != size:
                raise ModelRejected(f"{kind} {spec.name!r} axis {axis} is {got}, bundle.json says {size}")


def _validate(model: LoadedModel, slot_dir: Path) -> dict[str, np.ndarray]:
    manifest = model.manifest
    try:
        with np.load(slot_dir / VALIDATION_MEMBER, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError, ...
        raise ModelRejected(f"unreadable {VALIDATION_MEMBER}: {exc.__class__.__name__}: {exc}") from None
    inputs: dict[str, np.ndarray] = {}
    for spec in manifest.inputs:
        key = f"inputs/{spec.name}"
        if key not in arrays:
            raise ModelRejected(f"{VALIDATION_MEMBER} lacks {key!r}")
        inputs[spec.name] = arrays[key]
    expected: list[np.ndarray] = []
    for name in model.output_names:
        key = f"outputs/{name}"
        if key not in arrays:
            raise ModelRejected(f"{VALIDATION_MEMBER} lacks {key!r}")
        expected.append(arrays[key])
    try:
        model.check_inputs(inputs)
    except BadInput as exc:
        raise ModelRejected(f"validation inputs do not fit the signature: {exc}") from None
    try:
        got = model.run(inputs)
    except Exception as exc:
        raise ModelRejected(f"validation run failed: {exc}") from None
    v = manifest.validation
    if v.compare == "top1":
        e, g = expected[0], got[0]
        if e.shape != g.shape or not np.array_equal(np.argmax(e, axis=-1), np.argmax(g, axis=-1)):
            raise ModelRejected(f"validation top-1 of {model.output_names[0]!r} differs from the recorded")
        return inputs
    for name, e, g in zip(model.output_names, expected, got, strict=True):
        if e.shape != g.shape:
            raise ModelRejected(f"validation output {name!r} has shape {g.shape}, recorded {e.shape}")
        if not np.allclose(g, e, rtol=v.rtol, atol=v.atol):
            worst = float(np.nanmax(np.abs(g.astype(np.float64) - e.astype(np.float64))))
            raise ModelRejected(
                f"validation output {name!r} differs from the recorded one"
                f" (max abs diff {worst:.3g}, rtol {v.rtol:g}, atol {v.atol:g})"
            )
    return inputs


def load_slot(slot_dir: Path, *, intra_op_threads: int = 1, warmup_runs: int = 3) -> LoadedModel:
    """Load, check, validate and warm the model in ``slot_dir``; raise :class:`ModelRejected`.

    A *new* ``onnxruntime.InferenceSession`` (CPU, ``intra_op_threads`` threads, one inter-op
    thread); its inputs and outputs are checked against the manifest's TensorSpecs (names, element
    types, ranks, fixed dimensions), the ``validation.npz`` inputs are run and the outputs compared
    with the recorded ones (``allclose`` with the bundle's rtol/atol, or ``top1``), then a few more
    runs warm the session up. Nothing of a rejected model is kept."""
    started = time.perf_counter()
    slot_dir = Path(slot_dir)
    try:
        manifest = BundleManifest.model_validate_json((slot_dir / MANIFEST_MEMBER).read_bytes())
    except (OSError, ValidationError, ValueError) as exc:
        raise ModelRejected(f"unreadable {MANIFEST_MEMBER}: {str(exc).splitlines()[0]}") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(slot_dir / MODEL_MEMBER), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ModelRejected(f"onnxruntime cannot load the model: {exc}") from None
    _check_signature("input", manifest.inputs, session.get_inputs())
    _check_signature("output", manifest.outputs, session.get_outputs())
    checks = []
    for spec in manifest.inputs:
        fixed = tuple((i, d) for i, d in enumerate(spec.shape) if isinstance(d, int))
        checks.append(_InputCheck(spec.name, np.dtype(spec.dtype), len(spec.shape), fixed))
    model = LoadedModel(
        manifest=manifest,
        session=session,
        path=slot_dir,
        input_names=tuple(s.name for s in manifest.inputs),
        output_names=tuple(s.name for s in manifest.outputs),
        checks=tuple(checks),
        load_ms=0.0,
    )
    try:
        inputs = _validate(model, slot_dir)
    except ModelRejected:
        raise
    except Exception as exc:  # e.g. a comparison the recorded arrays' dtypes do not allow
        raise ModelRejected(f"validation failed: {exc.__class__.__name__}: {exc}") from None
    try:
        for _ in range(warmup_runs):
            model.run(inputs)
    except Exception as exc:
        raise ModelRejected(f"warm-up failed: {exc.__class__.__name__}: {exc}") from None
    load_ms = (time.perf_counter() - started) * 1000
    log.info("loaded %s %s from %s in %.1f ms", manifest.name, manifest.version, slot_dir, load_ms)
    return LoadedModel(**{**model.__dict__, "load_ms": load_ms})
