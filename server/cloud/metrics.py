"""The cloud tier's own health at ``/metrics`` (Prometheus text): requests and errors by model
and status, latency quantiles of the recent requests, queue depth, batch sizes, models loaded and
repository refreshes. Counters go through :class:`server.metrics.Metrics`; the rest is kept here."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping

import numpy as np

from server.metrics import Metrics

#: upper bounds of the batch-size histogram buckets
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANTILES = (0.5, 0.95, 0.99)


def _labels(**labels: str) -> str:
    body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{{{body}}}" if body else ""


class CloudMetrics:
    """Thread-safe; every request and batch is recorded in O(1)."""

    def __init__(self, latency_window: int = 4096) -> None:
        self.counters = Metrics()
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._batch_hist: dict[str, list[int]] = {}
        self._batch_max: dict[str, int] = {}
        self._batch_sum: dict[str, int] = {}

    def request(self, model: str, status: int, seconds: float | None = None) -> None:
        """One answered inference request (``seconds`` only for answered ones, 200s and 500s)."""
        self.counters.inc(
            "fleet_cloud_requests_total", help="inference requests by model and HTTP status",
            model=model, status=str(status),
        )  # fmt: skip
        if seconds is not None:
            with self._lock:
                self._latencies.append(seconds)

    def error(self, reason: str) -> None:
        self.counters.inc(
            "fleet_cloud_errors_total", help="refused or failed requests by reason", reason=reason
        )

    def batch(self, model: str, size: int) -> None:
        """One ``session.run`` that answered ``size`` requests."""
        self.counters.inc("fleet_cloud_batches_total", help="session runs by model", model=model)
        with self._lock:
            hist = self._batch_hist.setdefault(model, [0] * len(BATCH_BUCKETS))
            for i, bound in enumerate(BATCH_BUCKETS):
                if size <= bound:
                    hist[i] += 1
                    break
            self._batch_max[model] = max(self._batch_max.get(model, 0), size)
            self._batch_sum[model] = self._batch_sum.get(model, 0) + size

    def example(self, result: str) -> None:
        """One request marked ``fleet_collect``: kept, too_large, disabled (cap 0) or error."""
        self.counters.inc(
            "fleet_cloud_examples_total", help="requests marked for hard-example collection", result=result
        )

    def sync(self, result: str) -> None:
        self.counters.inc("fleet_cloud_repository_refresh_total", help="repository refreshes", result=result)

    def latency_quantiles(self) -> dict[float, float]:
        with self._lock:
            samples = np.fromiter(self._latencies, dtype=np.float64)
        if samples.size == 0:
            return {}
        return {q: float(np.quantile(samples, q)) for q in QUANTILES}

    def batch_size_max(self, model: str) -> int:
        with self._lock:
            return self._batch_max.get(model, 0)

    def render(self, gauges: Mapping[str, tuple[str, list[tuple[dict[str, str], float]]]]) -> str:
        """Counters, then the latency summary, batch histograms and ``gauges``
        (name -> (help, [(labels, value)]))."""
        lines = [self.counters.render().rstrip("\n")]
        quantiles = self.latency_quantiles()
        if quantiles:
            lines += [
                "# HELP fleet_cloud_request_seconds inference latency of the recent requests",
                "# TYPE fleet_cloud_request_seconds summary",
            ]
            lines += [f'fleet_cloud_request_seconds{{quantile="{q}"}} {v:.6f}' for q, v in quantiles.items()]
        with self._lock:
            hists = {m: list(h) for m, h in self._batch_hist.items()}
            sums = dict(self._batch_sum)
            maxima = dict(self._batch_max)
        if hists:
            lines += [
                "# HELP fleet_cloud_batch_size requests answered by one session run",
                "# TYPE fleet_cloud_batch_size histogram",
            ]
            for model, hist in sorted(hists.items()):
                running = 0
                for bound, count in zip(BATCH_BUCKETS, hist, strict=True):
                    running += count
                    le = _labels(model=model, le=str(bound))
                    lines.append(f"fleet_cloud_batch_size_bucket{le} {running}")
                lines.append(f"fleet_cloud_batch_size_bucket{_labels(model=model, le='+Inf')} {running}")
                lines.append(f"fleet_cloud_batch_size_sum{_labels(model=model)} {sums[model]}")
                lines.append(f"fleet_cloud_batch_size_count{_labels(model=model)} {running}")
            lines += [
                "# HELP fleet_cloud_batch_size_max the largest batch so far",
                "# TYPE fleet_cloud_batch_size_max gauge",
            ]
            lines += [f"fleet_cloud_batch_size_max{_labels(model=m)} {v}" for m, v in sorted(maxima.items())]
        for name, (text, samples) in gauges.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
            lines += [f"{name}{_labels(**labels)} {value:g}" for labels, value in samples]
        return "\n".join(line for line in lines if line) + "\n"
