"""fp32 against the int8 variants the server builds on push, measured in one run (docs/benchmarks.md).

    .venv/bin/python bench/variants.py [--runs 21] [--row-runs 201] [--no-write]

For each model (the digits edge and cloud models of server/digits.py, a small CNN built here with
onnx helpers, and PP-OCR's text-direction classifier from PyPI's rapidocr-onnxruntime wheel when
`make third-party-models` could fetch it) builds the int8 variants with the server's own code
(server/catalog/quantize.py: dynamic, and static QDQ calibrated on a separate calibration set as
`--calibration-data` does), then measures size, top-1 agreement with fp32 on the validation inputs,
and latency: the median of `--runs` runs on the whole validation batch and of `--row-runs` runs on
one row, fp32 and int8 interleaved, in sessions with the server's options (one thread). Writes
bench/results/variants.json: a list with one object per model and calibration. Exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from benchlib import RESULTS, cpu_model
from onnx import TensorProto, helper, numpy_helper

from device_client.enroll import read_cpu_flags
from device_client.protocol.bundle import ValidationSpec
from server.catalog.quantize import UPLOADED, Calibration, agreement, quantize_int8
from server.catalog.validation import load_onnx
from server.digits import INPUT, build_digits_pair, digits_split
from tests.helpers.third_party_models import ppocr_cls, text_lines

#: the CPU flags that decide int8 speed (onnxruntime's VNNI kernels, else AVX2)
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "avx2")


@dataclass(frozen=True)
class Case:
    """One fp32 model, its validation inputs and a separate calibration set."""

    name: str
    path: Path
    feeds: dict[str, np.ndarray]
    calibration: dict[str, np.ndarray]
    #: how the validation inputs were made (said in the output: random inputs are not real data)
    inputs: str


def small_cnn(path: Path, seed: int = 0) -> Path:
    """A small image classifier built with onnx helpers: three 3x3 convolutions (3->16->32->64,
    ReLU, the last two stride 2), global average pooling and a 64->10 dense layer; He-initialised
    random weights (seeded) on ``x`` ``[N, 3, 32, 32]``."""
    rng = np.random.default_rng(seed)

    def he(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    inits, nodes, prev = [], [], "x"
    for i, (cin, cout, stride) in enumerate([(3, 16, 1), (16, 32, 2), (32, 64, 2)]):
        inits += [numpy_helper.from_array(he(cout, cin, 3, 3), f"w{i}"),
                  numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]  # fmt: skip
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3],
                             pads=[1, 1, 1, 1], strides=[stride, stride]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]  # fmt: skip
        prev = f"r{i}"
    dense = (rng.standard_normal((64, 10)) * np.sqrt(2.0 / 64)).astype(np.float32)
    inits += [numpy_helper.from_array(dense, "wd"),
              numpy_helper.from_array(np.zeros(10, np.float32), "bd")]  # fmt: skip
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wd", "bd"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def cases(work: Path) -> list[Case]:
    pair = build_digits_pair(work)
    calib = {INPUT: digits_split()[0][:200]}  # training rows: not the held-out validation ones
    rng = np.random.default_rng(1)
    found = [
        Case("digits edge", pair.edge, {INPUT: pair.x_val}, calib, f"{len(pair.x_val)} held-out digits"),
        Case("digits cloud", pair.cloud, {INPUT: pair.x_val}, calib, f"{len(pair.x_val)} held-out digits"),
        Case(
            "small CNN (random weights)",
            small_cnn(work / "cnn.onnx"),
            {"x": rng.random((64, 3, 32, 32), dtype=np.float32)},
            {"x": rng.random((32, 3, 32, 32), dtype=np.float32)},
            "64 random images",
        ),
    ]
    ocr = ppocr_cls()
    if ocr is None:
        print("  PP-OCR's classifier is not in .cache/ (`make third-party-models`): left out")
    else:
        found.append(Case(
            "PP-OCR text direction (third-party)", ocr, {"x": text_lines(64, seed=0)[0]},
            {"x": text_lines(16, seed=1)[0]}, "64 synthetic text lines",
        ))  # fmt: skip
    return found


def interleaved_medians(sessions: list[Any], feeds: dict[str, np.ndarray], runs: int) -> list[float]:
    """Median seconds per run of each session on ``feeds``: one warm-up each, then ``runs``
    rounds running every session once, in an order that alternates between rounds."""
    for s in sessions:
        s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(runs):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            t0 = time.perf_counter()
            sessions[i].run(None, feeds)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def measure(case: Case, work: Path, runs: int, row_runs: int) -> list[dict[str, Any]]:
    fp32 = load_onnx(case.path)
    names = [o.name for o in fp32.outputs]
    reference = dict(zip(names, fp32.session.run(None, case.feeds), strict=True))
    builds = []
    for calibration, feeds, label in (
        (Calibration.dynamic, case.feeds, Calibration.dynamic.value),
        (Calibration.static, case.calibration, UPLOADED),
    ):
        out = work / f"{case.path.stem}-{label.replace(':', '-')}.onnx"
        quantize_int8(case.path, out, calibration, feeds)
        builds.append((label, out, load_onnx(out)))
    sessions = [fp32.session, *(b[2].session for b in builds)]
    batch = interleaved_medians(sessions, case.feeds, runs)
    one_row = {k: v[:1] for k, v in case.feeds.items()}
    row = interleaved_medians(sessions, one_row, row_runs)
    fp32_bytes = case.path.stat().st_size
    rows = []
    for i, (label, out, model) in enumerate(builds, start=1):
        got = dict(zip(names, model.session.run(None, case.feeds), strict=True))
        share, metric = agreement(reference, got, ValidationSpec())
        rows.append({
            "model": case.name, "calibration": label, "inputs": case.inputs,
            "fp32_bytes": fp32_bytes, "int8_bytes": out.stat().st_size,
            "size_ratio": round(out.stat().st_size / fp32_bytes, 4),
            "agreement": round(share, 6), "agreement_metric": metric,
            "fp32_batch_ms": round(batch[0] * 1000, 3), "int8_batch_ms": round(batch[i] * 1000, 3),
            "latency_ratio": round(batch[i] / batch[0], 4),
            "fp32_row_ms": round(row[0] * 1000, 4), "int8_row_ms": round(row[i] * 1000, 4),
            "latency_ratio_row": round(row[i] / row[0], 4),
            "batch_rows": len(next(iter(case.feeds.values()))), "runs": runs, "row_runs": row_runs,
        })  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21, help="timed runs on the whole validation batch")
    ap.add_argument("--row-runs", type=int, default=201, help="timed runs on one row")
    ap.add_argument("--no-write", action="store_true", help="print only (no bench/results/variants.json)")
    args = ap.parse_args()
    flags = read_cpu_flags()
    host = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "int8_cpu_flags": [f for f in INT8_FLAGS if f in flags],
    }
    print(f"fp32 / int8 on {host['cpus']} cores, {host['cpu_model']}; int8 CPU flags: "
          f"{', '.join(host['int8_cpu_flags']) or 'none of ' + ', '.join(INT8_FLAGS)}")  # fmt: skip
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
        for case in cases(Path(tmp)):
            results += [r | host for r in measure(case, Path(tmp), args.runs, args.row_runs)]
    head = f"  {'model':<36} {'calibration':<16} {'fp32 B':>9} {'int8 B':>9} {'size':>5} " \
           f"{'agree':>7} {'batch':>6} {'1 row':>6}"  # fmt: skip
    print(head)
    for r in results:
        print(
            f"  {r['model']:<36} {r['calibration']:<16} {r['fp32_bytes']:>9,} {r['int8_bytes']:>9,} "
            f"{r['size_ratio']:>5.2f} {r['agreement']:>7.2%} {r['latency_ratio']:>6.2f} "
            f"{r['latency_ratio_row']:>6.2f}"
        )
    print("  size, batch and 1 row: int8 / fp32 (latency: medians, interleaved, one thread); "
          "agree: top-1 agreement with fp32 on the validation inputs")  # fmt: skip
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / "variants.json"
        path.write_text(json.dumps(results, indent=1))
        print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
