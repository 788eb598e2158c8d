"""Shared set-up of the router tests: a real edge model, a real OIP peer, and a router built with
a clock the test moves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from device_client.protocol.routing import parse_routing_policy
from device_client.routing import OipClient, Router, RoutingStats
from device_client.routing.breaker import CircuitBreaker
from device_client.routing.budget import TokenBucket
from device_client.routing.cache import AnswerCache

#: with the classifier of seed 0: all logits equal (unsure) / one class far ahead (sure)
UNSURE = np.zeros((1, 4), np.float32)
SURE = np.array([[3, -3, 3, -3]], np.float32)


class Clock:
    def __init__(self, t: float = 1_900_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def session_edge(path: Path) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]

    def edge(inputs):
        return dict(zip(names, sess.run(None, dict(inputs)), strict=True))

    return edge


def policy_doc(mode: str = "prefer_edge", **over) -> dict:
    doc = {
        "mode": mode,
        "confidence": {"output": "logits", "softmax": True, "kind": "max_prob", "threshold": 0.9},
        "cloud": {"endpoint": "fleet", "model": "big", "timeout_ms": 2000},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


def make_router(
    tmp_path: Path,
    edge,
    url: str | None,
    *,
    clock: Clock | None = None,
    rand: Callable[[], float] = lambda: 0.99,
    stats: RoutingStats | None = None,
    background_queue: int = 16,
    **policy_over,
) -> Router:
    """A router over ``edge`` asking the peer at ``url`` (None: no cloud client)."""
    clock = clock or Clock()
    policy = parse_routing_policy(policy_doc(**policy_over))
    client, cloud = None, policy.cloud
    if url is not None and cloud is not None:
        client = OipClient(url, cloud.model, cloud.version, timeout_s=cloud.timeout_ms / 1000)
    c = policy.cache
    cache = AnswerCache(tmp_path / "cache", max_bytes=c.max_bytes, ttl_s=c.ttl_s, clock=clock)
    budget = TokenBucket(policy.budget.per_minute, policy.budget.burst, clock=clock)
    b = policy.breaker
    breaker = CircuitBreaker(b.failures, b.open_s, b.probes, clock=clock)
    stats = stats or RoutingStats(clock=clock)
    return Router(
        policy,
        edge,
        client,
        cache,
        budget,
        breaker,
        clock,
        stats,
        rand=rand,
        background_queue=background_queue,
    )
