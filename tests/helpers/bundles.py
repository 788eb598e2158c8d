"""Build real bundle tars (model.onnx + validation.npz + bundle.json) for device, security and
integration tests; :data:`FIELDS`, the manifest fields of a small ``det`` bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from device_client.protocol.bundle import MODEL_MEMBER, VALIDATION_MEMBER, BundleManifest, build_bundle
from tests.helpers.onnx_models import make_model

#: manifest fields of a small ``det`` bundle (``build_bundle(dest, FIELDS, members)``)
FIELDS = {
    "name": "det",
    "version": "1.0.0",
    "release": 1,
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 3]}],
}


def validation_inputs(in_dim: int = 4, n: int = 8, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).random((n, in_dim), dtype=np.float32)


def write_validation(model_path: Path, dest: Path, x: np.ndarray, *, perturb: float = 0.0) -> Path:
    """Record the model's own outputs on ``x`` (as the server does), optionally perturbed."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    name_in = sess.get_inputs()[0].name
    arrays: dict[str, np.ndarray] = {f"inputs/{name_in}": x}
    for out, value in zip(sess.get_outputs(), sess.run(None, {name_in: x}), strict=True):
        arrays[f"outputs/{out.name}"] = value + np.float32(perturb)
    np.savez(dest, **arrays)  # type: ignore[arg-type]
    return dest


def make_bundle(
    workdir: Path,
    *,
    name: str = "clf",
    version: str = "1.0.0",
    release: int = 1,
    variant: str = "default",
    in_dim: int = 4,
    out_dim: int = 3,
    scale: float = 1.0,
    bias: float = 0.0,
    seed: int = 0,
    slow_factor: int = 0,
    nan_on_negative: bool = False,
    perturb_validation: float = 0.0,
    manifest_overrides: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
    model_file: Path | None = None,
    validation_x: np.ndarray | None = None,
) -> tuple[Path, BundleManifest]:
    """Write ``<workdir>/<name>-<version>.tar`` and return (path, manifest)."""
    src = workdir / f"src-{name}-{version}-{variant}"
    src.mkdir(parents=True, exist_ok=True)
    model = model_file or make_model(
        src / MODEL_MEMBER,
        in_dim=in_dim,
        out_dim=out_dim,
        scale=scale,
        bias=bias,
        seed=seed,
        slow_factor=slow_factor,
        nan_on_negative=nan_on_negative,
    )
    x = validation_inputs(in_dim) if validation_x is None else validation_x
    npz = write_validation(model, src / VALIDATION_MEMBER, x, perturb=perturb_validation)
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "release": release,
        "variant": variant,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", in_dim]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", out_dim]}],
        "validation": validation or {"rtol": 1e-4, "atol": 1e-5, "compare": "allclose"},
    }
    fields.update(manifest_overrides or {})
    dest = workdir / f"{name}-{version}-{variant}.tar"
    manifest = build_bundle(dest, fields, {MODEL_MEMBER: model, VALIDATION_MEMBER: npz})
    return dest, manifest


def make_reshape_model(path: Path) -> Path:
    """x[N, 4] -> Reshape to [-1, 3]: runs when 4*N is divisible by 3 and raises otherwise."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 3])],
        initializer=[numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
