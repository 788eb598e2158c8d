"""Building and measuring an int8 variant of a pushed fp32 model (``--quantize int8``).

Quantization uses ``onnxruntime.quantization``: dynamic (weights int8, activations quantized at
run time) by default, or static in QDQ format, calibrated on an uploaded calibration set or else on
the validation inputs. The int8 model is measured against the fp32 one on the validation inputs:
size, agreement (top-1 for classifiers, within the validation tolerance otherwise) and latency
relative to fp32 on this CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from device_client.protocol.bundle import TensorSpec, ValidationSpec
from server.errors import Invalid

#: timed runs of each model on the validation inputs (after one warm-up run); the median counts
SPEED_RUNS = 5
DEFAULT_MIN_AGREEMENT = 0.99


class Calibration(StrEnum):
    dynamic = "dynamic"
    static = "static"


@dataclass(frozen=True)
class VariantMeasurement:
    """What a push records of a variant, relative to the fp32 model it was built from."""

    size_bytes: int
    size_ratio: float
    agreement: float
    #: ``top1`` (arg-max of the first output, per row) or ``tolerance`` (every element)
    agreement_metric: str
    #: median latency on the validation inputs, this variant / fp32, on the server's CPU
    latency_ratio: float
    #: ``dynamic``, ``static`` (on the validation inputs) or ``static:uploaded``
    calibration: str | None = None
    #: rows the static calibration ran on
    calibration_rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return (
            {
                "size_bytes": self.size_bytes,
                "size_ratio": round(self.size_ratio, 4),
                "agreement": round(self.agreement, 6),
                "agreement_metric": self.agreement_metric,
                "latency_ratio": round(self.latency_ratio, 4),
            }
            | ({"calibration": self.calibration} if self.calibration else {})
            | ({"calibration_rows": self.calibration_rows} if self.calibration_rows is not None else {})
        )


#: what the measurements say of a static calibration on an uploaded calibration set
UPLOADED = "static:uploaded"


def batched_inputs(inputs: Sequence[TensorSpec]) -> frozenset[str]:
    """The inputs whose first dimension is symbolic (a batch): a static calibration runs on one row
    of them at a time; the others (scalars, a fixed first dimension) are fed whole with every row."""
    return frozenset(s.name for s in inputs if s.shape and not isinstance(s.shape[0], int))


def calibration_rows(feeds: dict[str, np.ndarray], batched: Collection[str] | None = None) -> int:
    """Rows a static calibration runs on ``feeds``: one per row of the ``batched`` inputs
    (:func:`batched_inputs`; None: every input but the scalars), one when there are none."""
    return min((len(v) for k, v in feeds.items() if _batched(k, v, batched)), default=1)


def _batched(name: str, value: np.ndarray, batched: Collection[str] | None) -> bool:
    return value.ndim > 0 if batched is None else name in batched


class _Feeds:
    """A CalibrationDataReader over calibration inputs, one row of the batch at a time."""

    def __init__(self, feeds: dict[str, np.ndarray], batched: Collection[str] | None = None) -> None:
        rows = calibration_rows(feeds, batched)
        self._items: Iterator[dict[str, np.ndarray]] = iter(
            [
                {k: (v[i : i + 1] if _batched(k, v, batched) else v) for k, v in feeds.items()}
                for i in range(rows)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_int8(
    src: Path,
    dst: Path,
    calibration: Calibration,
    feeds: dict[str, np.ndarray],
    *,
    batched: Collection[str] | None = None,
) -> None:
    """Write the int8 build of ``src`` to ``dst``; :class:`Invalid` if onnxruntime cannot.
    ``batched``: the inputs a static calibration feeds row by row (:func:`calibration_rows`)."""
    from onnxruntime import quantization as q

    try:
        if calibration == Calibration.static:
            q.quantize_static(
                str(src),
                str(dst),
                _Feeds(feeds, batched),  # a duck-typed CalibrationDataReader
                quant_format=q.QuantFormat.QDQ,
                activation_type=q.QuantType.QInt8,
                weight_type=q.QuantType.QInt8,
            )
        else:
            q.quantize_dynamic(str(src), str(dst), weight_type=q.QuantType.QInt8)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise Invalid(f"the model cannot be quantized to int8 ({calibration}): {first}") from None


def is_classifier(outputs: dict[str, np.ndarray]) -> bool:
    """A first output of float scores ``[N, C]`` with C > 1 is read as a classifier's."""
    first = next(iter(outputs.values()))
    return first.dtype.kind == "f" and first.ndim == 2 and first.shape[1] > 1


def agreement(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], spec: ValidationSpec
) -> tuple[float, str]:
    """Share of agreeing answers: top-1 rows for a classifier, else elements within tolerance."""
    if is_classifier(reference) or spec.compare == "top1":
        name = next(iter(reference))
        ref, got = reference[name], candidate[name]
        ref2, got2 = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
        same = np.argmax(ref2, axis=1) == np.argmax(got2, axis=1)
        return float(np.mean(same)), "top1"
    hits = total = 0
    for name, ref in reference.items():
        got = candidate[name]
        if got.shape != ref.shape:
            return 0.0, "tolerance"
        close = np.isclose(got, ref, rtol=spec.rtol, atol=spec.atol)
        hits += int(np.count_nonzero(close))
        total += close.size
    return (hits / total if total else 1.0), "tolerance"


def median_latency_s(session: Any, feeds: dict[str, np.ndarray], runs: int = SPEED_RUNS) -> float:
    """Median wall time of ``runs`` runs on ``feeds`` after one warm-up run."""
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
