"""One device's health over a span as sums (:class:`DeviceHealth`): what the health repository
reads in one GROUP BY and the rollout gates (:func:`server.rollouts.policy.robust_health`) judge.

Pure: no database, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceHealth:
    """One device's health windows over a span, as sums (what one GROUP BY row holds)."""

    windows: int = 0
    requests: int = 0
    errors: int = 0
    #: requests of the windows that reported a p95, and the sum of p95_ms * requests over them
    p95_requests: int = 0
    p95_weighted_ms: float = 0.0
    #: shadow requests of the windows that reported an agreement, and agreement * them summed
    shadow_requests: int = 0
    agreement_weighted: float = 0.0
    #: requests of the windows that reported escalations, and the escalations they reported
    routed_requests: int = 0
    escalations: int = 0
    #: cloud comparisons of the windows that reported a cloud agreement, and agreement * them summed
    cloud_compared: int = 0
    cloud_agreement_weighted: float = 0.0
    #: requests of the windows that reported a CPU time per request, and cpu_ms * them summed
    cpu_requests: int = 0
    cpu_weighted_ms: float = 0.0
    #: the variant its windows name (the greatest, should they name several; None: none does)
    variant: str | None = None
