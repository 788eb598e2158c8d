"""Shadow mode: a candidate model runs on a sample of live requests, off the callers' path, and
its outputs are compared with what the serving model answered (:class:`ShadowRunner`)."""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..health import HealthRecorder
from .loader import LoadedModel, all_finite


def outputs_agree(
    expected: Sequence[np.ndarray], got: Sequence[np.ndarray], *, rtol: float, atol: float
) -> bool:
    """Shadow comparison: top-1 equality for 2-D outputs with >1 class, else allclose."""
    if len(expected) != len(got):
        return False
    for e, g in zip(expected, got, strict=True):
        if e.shape != g.shape:
            return False
        if e.ndim == 2 and e.shape[1] > 1:
            if not np.array_equal(np.argmax(e, axis=1), np.argmax(g, axis=1)):
                return False
        elif not np.allclose(e, g, rtol=rtol, atol=atol):
            return False
    return True


_STOP = object()


class ShadowRunner:
    """Runs ``candidate`` on a random sample (``sample_rate``) of live requests in one background
    thread fed by a bounded queue: a sampled request whose queue slot is not free is dropped (and
    counted), never waited for. Agreement (:func:`outputs_agree`) and shadow latency go into the
    recorder. The candidate never answers a caller."""

    def __init__(
        self,
        candidate: LoadedModel,
        recorder: HealthRecorder,
        *,
        sample_rate: float,
        queue_size: int,
        rtol: float,
        atol: float,
    ) -> None:
        self.candidate = candidate
        self.recorder = recorder
        self.sample_rate = sample_rate
        self.rtol = rtol
        self.atol = atol
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._random = random.random
        self._thread = threading.Thread(target=self._work, name=f"shadow-{candidate.name}", daemon=True)
        self._thread.start()

    def offer(self, inputs: Mapping[str, np.ndarray], outputs: list[np.ndarray]) -> None:
        """Maybe queue a copy of one request for the candidate; never blocks."""
        if self.sample_rate < 1.0 and self._random() >= self.sample_rate:
            return
        item = ({k: np.array(v, copy=True) for k, v in inputs.items()}, [o.copy() for o in outputs])
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.recorder.record_shadow_drop()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            inputs, expected = item
            t0 = time.perf_counter_ns()
            try:
                got = self.candidate.run(inputs)
            except Exception:
                self.recorder.record_shadow(time.perf_counter_ns() - t0, agreed=False, error=True)
                continue
            dt = time.perf_counter_ns() - t0
            finite = all_finite(got)
            agreed = finite and outputs_agree(expected, got, rtol=self.rtol, atol=self.atol)
            self.recorder.record_shadow(dt, agreed=agreed, error=not finite)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued samples, then stop the worker."""
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
