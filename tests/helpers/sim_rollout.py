"""The rollout body the simulated-fleet integration tests start (simulator, ingest processes,
replicas): the whole fleet of one tag, gates loose enough for simulated health, a short probation.
"""

from __future__ import annotations

from typing import Any


def sim_rollout_body(
    tag: str, version: str = "2.0.0", *, stages: list[dict[str, Any]], **over: Any
) -> dict[str, Any]:
    """A rollout of model ``det`` ``version`` to the devices tagged ``fleet=tag``; ``over``
    replaces top-level fields (``on_failure``, ``gates``, ...)."""
    body: dict[str, Any] = {
        "model": "det", "version": version, "selector": {"tags": {"fleet": tag}}, "stages": stages,
        "max_concurrent_downloads": 1000, "probation": {"seconds": 0.3}, "on_failure": "pause",
        "gates": {"max_failure_ratio": 0.1, "max_error_rate": 0.05, "max_p95_ratio": None,
                  "min_agreement": None, "min_requests": 1},
    }  # fmt: skip
    body.update(over)
    return body
