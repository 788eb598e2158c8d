"""Micro-batching (:class:`Batcher`) and the bounded queue in front of it (:class:`AdmissionGate`).

Concurrent requests for one model version are run as one ``session.run`` on their inputs
concatenated along the first axis, when every input and output of the model has a dynamic first
dimension (:func:`batchable`), and their outputs split back; other models run one request at a
time. The gate bounds what is queued and running across all batchers: a request it does not admit
is answered 503 at once, so memory never grows with the offered load."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from device_client.runtime import LoadedModel
from server.cloud.errors import InferenceFailed

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]


class AdmissionGate:
    """At most ``capacity`` requests admitted and not yet answered (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._depth = 0

    @property
    def depth(self) -> int:
        return self._depth

    def try_enter(self) -> bool:
        with self._lock:
            if self._depth >= self.capacity:
                return False
            self._depth += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._depth -= 1


def batchable(model: LoadedModel) -> bool:
    """Whether requests for ``model`` may be concatenated: every input and output has a dynamic
    (symbolic or unnamed) first dimension."""
    specs = [*model.manifest.inputs, *model.manifest.outputs]
    return all(len(s.shape) >= 1 and not isinstance(s.shape[0], int) for s in specs)


@dataclass
class _Item:
    model: LoadedModel
    inputs: dict[str, np.ndarray]
    future: Future[Outputs]


_STOP = object()


class Batcher:
    """The requests of one model name, run on one worker thread of its own.

    It takes the first waiting request and collects more for up to ``window_s`` (once the window
    is over, only what is already waiting) until ``max_batch``; requests for the same model
    version with the same per-row shapes run as one batch. A batch whose run fails, or whose
    outputs do not have one row per input row, is run again request by request, so one bad
    request never fails its neighbours. A request whose future was cancelled is skipped."""

    def __init__(
        self,
        name: str,
        *,
        window_s: float,
        max_batch: int,
        on_batch: Callable[[str, int], None] = lambda name, size: None,
    ) -> None:
        self.name = name
        self.window_s = window_s
        self.max_batch = max_batch
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"fleet-cloud-{name}", daemon=True)
        self._thread.start()

    def submit(self, model: LoadedModel, inputs: dict[str, np.ndarray]) -> Future[Outputs]:
        """Queue one request (inputs already checked against ``model``); the future gets its outputs
        by name, or :class:`~server.cloud.errors.InferenceFailed`."""
        future: Future[Outputs] = Future()
        self._queue.put(_Item(model, inputs, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop once the requests queued so far are answered."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # ---------------------------------------------------------------- worker

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            items = [first]
            stop = False
            deadline = time.monotonic() + self.window_s
            while len(items) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                items.append(nxt)
            # a request whose caller went away (its future cancelled) is skipped
            live = [i for i in items if isinstance(i, _Item) and i.future.set_running_or_notify_cancel()]
            try:
                self._run(live)
            except Exception:  # never lose the worker: answer whatever is left
                log.exception("%s: batch failed", self.name)
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(InferenceFailed(f"{self.name}: internal error"))
            if stop:
                return

    def _run(self, items: list[_Item]) -> None:
        groups: dict[tuple[object, ...], list[_Item]] = {}
        for item in items:
            key: tuple[object, ...] = (id(item.model),)
            if batchable(item.model):
                key += tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(item.inputs.items()))
            else:
                key += (id(item),)  # a group of its own
            groups.setdefault(key, []).append(item)
        for group in groups.values():
            if len(group) == 1 or not self._run_batch(group):
                for item in group:
                    self._run_one(item)

    def _run_batch(self, group: list[_Item]) -> bool:
        """Run ``group`` as one batch; False (nothing answered) if it must run one by one."""
        model = group[0].model
        if any(len({a.shape[0] for a in i.inputs.values()}) != 1 for i in group):
            return False  # the first axes differ within a request: it is not a batch axis
        rows = [next(iter(i.inputs.values())).shape[0] for i in group]
        feeds = {name: np.concatenate([i.inputs[name] for i in group]) for name in model.input_names}
        try:
            outs = model.session.run(list(model.output_names), feeds)
        except Exception as exc:
            log.info("%s %s: batch of %d failed (%s); running it one by one", model.name, model.version,
                     len(group), exc)  # fmt: skip
            return False
        total = sum(rows)
        if any(o.ndim == 0 or o.shape[0] != total for o in outs):
            return False
        self.on_batch(self.name, len(group))
        start = 0
        named = list(zip(model.output_names, outs, strict=True))
        for item, n in zip(group, rows, strict=True):
            item.future.set_result({k: o[start : start + n] for k, o in named})
            start += n
        return True

    def _run_one(self, item: _Item) -> None:
        model = item.model
        try:
            outs = model.session.run(list(model.output_names), item.inputs)
        except Exception as exc:
            self.on_batch(self.name, 1)
            item.future.set_exception(InferenceFailed(f"{model.name} {model.version}: {exc}"))
        else:
            self.on_batch(self.name, 1)
            item.future.set_result(dict(zip(model.output_names, outs, strict=True)))
