"""One call to the cloud model: what is sent (the edge inputs, or an edge output for split
inference, under the cloud model's names), what comes back (under the edge's output names and
types), and a strict deadline for a caller who waits (the call runs on a small pool)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from ..protocol.routing import SEND_INPUT, CloudSpec, CollectSpec
from .oip import CloudAnswer, CloudFailure, OipClient

#: dtype kinds a cloud output may come in for an edge output of the same kind
_KINDS_COMPATIBLE = ("f", "iu", "b")


def payload_for(
    cloud: CloudSpec, inputs: Mapping[str, np.ndarray], edge_out: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """What the cloud model gets: the edge inputs, or the named edge output (split inference, so
    raw data stays on the device), renamed per ``cloud.inputs``."""
    if cloud.send == SEND_INPUT:
        src = inputs
    elif cloud.send in edge_out:
        src = {cloud.send: edge_out[cloud.send]}
    else:
        raise CloudFailure("bad_request", f"the edge model has no output {cloud.send!r} to send")
    return {cloud.inputs.get(n, n): np.asarray(a) for n, a in src.items()}


def fit(name: str, arr: np.ndarray, edge_out: Mapping[str, np.ndarray]) -> np.ndarray:
    """A cloud output standing in for the edge output ``name``: the same shape, in the edge's
    dtype (a float for a float, an integer for an integer); anything else is a bad answer."""
    edge = edge_out.get(name)
    if edge is None:
        return arr
    if arr.shape != edge.shape:
        raise CloudFailure("wrong_shape", f"output {name!r} has shape {arr.shape}, expected {edge.shape}")
    if arr.dtype == edge.dtype:
        return arr
    if not any(arr.dtype.kind in k and edge.dtype.kind in k for k in _KINDS_COMPATIBLE):
        raise CloudFailure("bad_answer", f"output {name!r} is {arr.dtype}, the edge model's is {edge.dtype}")
    return arr.astype(edge.dtype)


def output_map(cloud: CloudSpec, edge_out: Mapping[str, np.ndarray]) -> dict[str, str]:
    """{edge output: cloud output} of the outputs a cloud answer gives (default: every edge output
    under its own name)."""
    return dict(cloud.outputs) or {n: n for n in edge_out}


def to_edge(
    cloud: CloudSpec, cloud_out: Mapping[str, np.ndarray], edge_out: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """A cloud answer's outputs under the edge's names, shapes and dtypes (:func:`fit`)."""
    result = {}
    for e, c in output_map(cloud, edge_out).items():
        if c not in cloud_out:
            raise CloudFailure("missing_output", f"the cloud answer lacks output {c!r}")
        result[e] = fit(e, cloud_out[c], edge_out)
    return result


class CloudCall:
    """Asks ``client`` per ``cloud``; :meth:`ask` with ``wait`` (the caller's path) returns or
    fails within ``timeout_ms`` whatever the connection does."""

    def __init__(
        self,
        cloud: CloudSpec,
        collect: CollectSpec,
        client: OipClient,
        *,
        workers: int,
        rand: Callable[[], float],
    ) -> None:
        self.cloud = cloud
        self.collect = collect
        self.client = client
        self.timeout_s = cloud.timeout_ms / 1000.0
        self._rand = rand
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fleet-cloud")

    def ask(
        self, payload: Mapping[str, np.ndarray], edge_out: Mapping[str, np.ndarray], *, wait: bool
    ) -> tuple[dict[str, np.ndarray], CloudAnswer]:
        """The cloud's outputs under the edge's names, and the answer; raises CloudFailure."""
        mapping = output_map(self.cloud, edge_out)
        shapes = {c: tuple(edge_out[e].shape) for e, c in mapping.items() if e in edge_out}
        params = None
        if self.cloud.is_fleet and self.collect.enabled and self._rand() < self.collect.sample_rate:
            params = {"fleet_collect": True}  # the cloud may keep this input as a hard example
        kwargs: dict[str, Any] = {"outputs": list(mapping.values()), "shapes": shapes, "parameters": params}
        try:
            if wait:
                future = self._pool.submit(self.client.infer, payload, **kwargs, timeout_s=self.timeout_s)
                try:
                    ans = future.result(timeout=self.timeout_s)
                except FutureTimeout:
                    future.cancel()
                    raise CloudFailure("timeout", f"no answer within {self.timeout_s:g} s") from None
            else:
                ans = self.client.infer(payload, **kwargs, timeout_s=self.timeout_s)
        except CloudFailure:
            raise
        except Exception as exc:  # a closed pool, a client bug: a failure like any other
            raise CloudFailure("internal", f"{type(exc).__name__}: {exc}") from None
        return to_edge(self.cloud, ans.outputs, edge_out), ans

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
